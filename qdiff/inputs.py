"""Model input specs and the sources of input data fed to both models.

Data comes from one of:

* an ``.npz`` file whose keys are the model's input names and whose axis 0 indexes samples
  (an input of shape ``[1,3,H,W]`` takes an array ``[N,3,H,W]``, fed in slices of the batch size);
* a folder of ``.npz`` / ``.npy`` files, one sample each, read lazily in file-name order;
* in the API, a dict of arrays (as an .npz) or any iterable of ``{name: array}`` dicts;
* nothing: seeded random inputs drawn from the input spec.

Every batch is checked against the spec (names, dtypes, shapes, NaN/Inf) before it is run, and a
running SHA-256 of the fed data is kept for the result's meta.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from qdiff.errors import DataError, ModelError, ModelMismatchError, UsageError
from qdiff.graph import Graph

__all__ = [
    "InputSpec",
    "input_specs",
    "check_same_inputs",
    "parse_input_shapes",
    "DataSource",
    "make_source",
    "combine_fingerprint",
    "DataLike",
]

DataLike = Union[str, Path, Mapping[str, np.ndarray], Iterable[Mapping[str, np.ndarray]], None]

Dim = Union[int, str, None]


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (ints; str or None for dynamic axes)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    def shape_text(self) -> str:
        return "[" + ",".join(str(d) if d is not None else "?" for d in self.shape) + "]"

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)


def input_specs(graph: Graph) -> list[InputSpec]:
    """The real inputs of a model (initializers excluded)."""
    specs = []
    for name in graph.inputs:
        et = graph.elem_type(name) or onnx.TensorProto.FLOAT
        shape = graph.shape(name) or []
        if any(isinstance(d, int) and d == 0 for d in shape):
            text = "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
            raise ModelError(
                f"input '{name}' has a dimension of size 0 (shape {text}): it holds no values, so there is nothing to "
                "run or compare; re-export the model with a real size (or a dynamic dimension) there"
            )
        dims = tuple(d if (isinstance(d, int) and d > 0) else (d if isinstance(d, str) else None) for d in shape)
        specs.append(InputSpec(name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)), dims))
    return specs


def check_same_inputs(float_specs: list[InputSpec], quant_specs: list[InputSpec], float_label: str, quant_label: str) -> None:
    """Raise ModelMismatchError when the two models do not take the same inputs."""
    fnames = [s.name for s in float_specs]
    qnames = [s.name for s in quant_specs]
    if set(fnames) != set(qnames):
        raise ModelMismatchError(
            f"the models take different inputs: {fnames} in {float_label} but {qnames} in {quant_label}; "
            "compare a quantized model with the float model it was made from"
        )
    qby = {s.name: s for s in quant_specs}
    for f in float_specs:
        q = qby[f.name]
        if f.dtype.kind != q.dtype.kind:
            raise ModelMismatchError(
                f"input '{f.name}' is {f.dtype} in {float_label} but {q.dtype} in {quant_label}; "
                "the models must take the same kind of data"
            )
        bad = len(f.shape) != len(q.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(f.shape, q.shape)
        )
        if bad:
            raise ModelMismatchError(
                f"input '{f.name}' has shape {f.shape_text()} in {float_label} but {q.shape_text()} in {quant_label}; "
                "compare models exported for the same input size"
            )


def parse_input_shapes(items: Iterable[str] | Mapping[str, Iterable[int]] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x224x224`` items (or take a mapping) into ``{name: shape}``."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return {k: tuple(int(d) for d in v) for k, v in items.items()}
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = str(item).rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise UsageError(f"--input-shape '{item}' is not NAME:DIMS like input:1x3x224x224")
        count = 1
        for d in shape:
            count *= d
        if count > MAX_RANDOM_RUN_BYTES:  # at least one byte a value, whatever the input's type
            raise UsageError(
                f"--input-shape {item} asks for {count:,} values per run (at least {_human(count)}), more than the "
                f"{_human(MAX_RANDOM_RUN_BYTES)} of random inputs qdiff allows per run; give smaller dimensions"
            )
        out[name] = shape
    return out


class DataSource:
    """Batches of validated model inputs, read lazily, with a fingerprint of everything fed.

    Iterating yields ``{input name: array}`` dicts. After iteration, ``batches`` holds how many
    runs were produced, ``samples`` how many samples they held (axis 0 of a batched input; one
    per run otherwise) and ``fingerprint()`` the SHA-256 of the per-run digests in order.

    With ``shard=(k, n)`` only the runs of groups whose index is ``k`` modulo ``n`` are read and
    yielded (the others are not even loaded), run ``i`` being in group ``i // group``: ``n``
    processes with ``k = 0..n-1`` together see every run once, each group whole, and
    :func:`combine_fingerprint` of their ``digests`` equals the unsharded fingerprint.
    """

    def __init__(
        self,
        batches: Iterable[Any],
        specs: list[InputSpec],
        description: str,
        count: int | None,
        shard: tuple[int, int] = (0, 1),
    ):
        self._batches = batches
        self.specs = specs
        self.description = description
        self.count = count
        self.shard = shard
        self.group = 1
        self.batches = 0
        self.samples = 0
        self.digests: dict[int, str] = {}
        #: the data are qdiff's own seeded random values (no data was given)
        self.random = False

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        k, n = self.shard
        for i, item in enumerate(self._batches):
            if (i // self.group) % n != k:
                continue
            batch = item() if callable(item) else item
            checked = _validate(batch, self.specs, i, self.description)
            h = hashlib.sha256()
            for name in sorted(checked):
                arr = checked[name]
                h.update(name.encode())
                h.update(str(arr.shape).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
            self.digests[i] = h.hexdigest()
            self.batches += 1
            self.samples += _samples_in(checked, self.specs)
            yield checked

    def fingerprint(self) -> str:
        return combine_fingerprint(self.digests)


def combine_fingerprint(digests: Mapping[int, str]) -> str:
    """SHA-256 over the per-run digests in run order (the same however runs were sharded)."""
    h = hashlib.sha256()
    for i in sorted(digests):
        h.update(f"{i}:{digests[i]}\n".encode())
    return h.hexdigest()


def make_source(
    data: DataLike,
    specs: list[InputSpec],
    *,
    samples: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> DataSource:
    """Build the data source for ``compare`` (see the module docstring for the accepted data).

    Raises:
        DataError: the data does not exist or does not fit the model.
        UsageError: bad batch size / sample count, or a dynamic dimension without a shape.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    if seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {seed}")
    input_shapes = dict(input_shapes or {})
    unknown = set(input_shapes) - {s.name for s in specs}
    if unknown:
        raise UsageError(
            f"--input-shape names {sorted(unknown)}, which are not model inputs; the inputs are {[s.name for s in specs]}"
        )
    source = _make(data, specs, samples, batch_size, seed, input_shapes)
    source.shard = shard
    return source


def _make(data, specs, samples, batch_size, seed, input_shapes) -> DataSource:
    if data is None:
        return _random_source(specs, samples or 8, batch_size, seed, input_shapes)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise DataError(f"data '{path}' does not exist; pass an .npz file or a folder of .npz/.npy files")
        if path.is_dir():
            return _folder_source(path, specs, samples, batch_size)
        if path.suffix == ".npy" and len(specs) == 1:
            arrays = {specs[0].name: _load_npy(path, mmap=True)}
        else:
            arrays = _load_npz(path, rows=samples)
        return _array_source(arrays, specs, samples, batch_size, str(path))
    if isinstance(data, Mapping):
        return _array_source({k: np.asarray(v) for k, v in data.items()}, specs, samples, batch_size, "data dict")
    if isinstance(data, Iterable):
        it: Iterable[dict[str, np.ndarray]] = ({k: np.asarray(v) for k, v in d.items()} for d in data)
        if samples is not None:
            it = _take(it, samples)
        return DataSource(it, specs, "data iterable", samples)
    raise UsageError(f"data must be a path, a dict of arrays or an iterable of dicts, not {type(data).__name__}")


# -- sources ------------------------------------------------------------------------------


def _take(it: Iterable[Any], n: int) -> Iterator[Any]:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def _load_npz(path: Path, rows: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file; with ``rows``, only the first ``rows`` entries along axis 0.

    Each member is read as a stream from the zip file: its .npy header first, then only the
    bytes of the rows asked for, so ``--samples 2`` on a compressed file of gigabytes (a
    "zip bomb" of zeros, or just a big data set) decompresses two rows, not the whole array.
    np.load cannot do this: it has no mmap inside an .npz and reads a member whole.
    """
    import zipfile

    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic == b"\x93NUMPY":
            raise DataError(f"data '{path}' holds one array, not named inputs; save it with np.savez(path, input_name=array)")
        with zipfile.ZipFile(path) as zf:
            members = {(n[:-4] if n.endswith(".npy") else n): n for n in zf.namelist()}
            headers = {k: _npy_header(zf, m) for k, m in members.items()}
            if rows is not None:
                counts = {k: h[0][0] for k, h in headers.items() if h[0]}
                if len(set(counts.values())) > 1:
                    raise DataError(
                        f"data {path}: inputs hold different numbers of samples {counts}; give every input the same count"
                    )
            return {k: _npy_rows(zf, members[k], headers[k], rows) for k in members}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data '{path}' is not a readable .npz file ({type(exc).__name__}: {exc})") from None


def _npy_header(zf: Any, member: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from the header of an .npy member, nothing else read."""
    fmt = np.lib.format
    with zf.open(member) as fh:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            shape, fortran, dtype = fmt._read_array_header(fh, version)
    if dtype.hasobject:
        raise ValueError(f"member '{member}' holds Python objects (pickled), which qdiff does not load")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _npy_rows(zf: Any, member: str, header: tuple[tuple[int, ...], bool, np.dtype], rows: int | None) -> np.ndarray:
    """The first ``rows`` entries (all when None) along axis 0 of an .npy member, streamed."""
    shape, fortran, dtype = header
    fmt = np.lib.format
    with zf.open(member) as fh:
        if fortran or not shape or rows is None or rows >= shape[0]:
            fh.seek(0)
            return fmt.read_array(fh, allow_pickle=False)  # the whole array was asked for (or is tiny / F-ordered)
        version = fmt.read_magic(fh)
        (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0 if version == (2, 0)
         else lambda f: fmt._read_array_header(f, version))(fh)  # fmt: skip
        row_values = 1
        for d in shape[1:]:
            row_values *= d
        want = rows * row_values * dtype.itemsize
        buf = bytearray(want)
        view, got = memoryview(buf), 0
        while got < want:
            n = fh.readinto(view[got:])
            if not n:
                raise ValueError(f"member '{member}' ends after {got} of the {want} bytes its header promises")
            got += n
    return np.frombuffer(buf, dtype=dtype).reshape((rows,) + shape[1:])


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except Exception as exc:
        raise DataError(f"data '{path}' is not a readable .npy file ({type(exc).__name__}: {exc})") from None


def _check_names(keys: Iterable[str], specs: list[InputSpec], where: str) -> None:
    keys = set(keys)
    names = {s.name for s in specs}
    if keys != names:
        missing, extra = sorted(names - keys), sorted(keys - names)
        parts = []
        if missing:
            parts.append(f"lacks model input(s) {missing}")
        if extra:
            parts.append(f"has key(s) {extra} that are not model inputs")
        raise DataError(f"{where} {' and '.join(parts)}; the model's inputs are {sorted(names)}")


def _effective_batch(spec: InputSpec, batch_size: int, where: str) -> int:
    d0 = spec.shape[0] if spec.shape else None
    if isinstance(d0, int):
        if batch_size not in (1, d0):
            raise UsageError(
                f"input '{spec.name}' has a fixed batch dimension of {d0}; --batch-size {batch_size} cannot be fed "
                f"(use --batch-size 1{'' if d0 == 1 else f' or {d0}'})"
            )
        return d0
    return batch_size


def _array_source(
    arrays: dict[str, np.ndarray], specs: list[InputSpec], samples: int | None, batch_size: int, where: str
) -> DataSource:
    _check_names(arrays, specs, f"data {where}")
    plans = {}
    counts = set()
    for spec in specs:
        arr = arrays[spec.name]
        rank = len(spec.shape)
        if arr.ndim == rank + 1:  # one sample per index, the model input has no batch axis
            if batch_size != 1:
                _effective_batch(spec, batch_size, where)  # a fixed batch dimension says so itself
                raise UsageError(f"input '{spec.name}' has no batch axis; use --batch-size 1")
            n = arr.shape[0]
            plans[spec.name] = (1, True)
        elif arr.ndim == rank and rank > 0:
            step = _effective_batch(spec, batch_size, where)
            n = arr.shape[0]
            plans[spec.name] = (step, False)
        else:
            raise DataError(
                f"data {where}: array '{spec.name}' has shape {list(arr.shape)}, which does not fit model input "
                f"{spec.shape_text()}; axis 0 must index samples, e.g. [N{''.join(',' + str(d) for d in spec.shape[1:])}]"
            )
        counts.add(n)
    if len(counts) > 1:
        sizes = {k: arrays[k].shape[0] for k in arrays}
        raise DataError(f"data {where}: inputs hold different numbers of samples {sizes}; give every input the same count")
    total = counts.pop() if counts else 0
    if total == 0:
        raise DataError(f"data {where} holds no samples")
    if samples is not None:
        total = min(total, samples)
    step = max(s for s, _ in plans.values())
    fixed = any(isinstance(sp.shape[0], int) and sp.shape[0] > 1 for sp in specs if sp.shape)
    # a dynamic batch axis takes a shorter last batch; a fixed one (>1) needs full batches
    n = total // step if fixed else -(-total // step)
    if n == 0:
        raise DataError(f"data {where}: {total} sample(s) cannot fill one batch of {step}")

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for i in range(n):
            batch = {}
            for name, (step, squeeze) in plans.items():
                batch[name] = arrays[name][i] if squeeze else arrays[name][i * step : min((i + 1) * step, total)]
            yield batch

    return DataSource(gen(), specs, f"data {where}", n)


def _folder_source(path: Path, specs: list[InputSpec], samples: int | None, batch_size: int) -> DataSource:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
    if not files:
        raise DataError(f"data folder '{path}' holds no .npz or .npy files; put one sample per file there")
    if any(p.suffix == ".npy" for p in files) and len(specs) != 1:
        raise DataError(
            f"data folder '{path}' holds .npy files but the model has {len(specs)} inputs; use .npz files keyed by input name"
        )
    steps = {s.name: _effective_batch(s, batch_size, str(path)) for s in specs}
    step = max(steps.values()) if steps else 1
    if samples is not None:
        files = files[:samples]
    fixed = any(isinstance(sp.shape[0], int) and sp.shape[0] > 1 for sp in specs if sp.shape)
    n = len(files) // step if fixed else -(-len(files) // step)

    def read(p: Path) -> dict[str, np.ndarray]:
        if p.suffix == ".npy":
            d = {specs[0].name: _load_npy(p)}
        else:
            d = _load_npz(p)
        _check_names(d, specs, f"data file '{p.name}'")
        out = {}
        for spec in specs:
            arr = d[spec.name]
            if arr.ndim == len(spec.shape) - 1:
                arr = arr[None]
            out[spec.name] = arr
        return out

    def load(i: int) -> dict[str, np.ndarray]:
        group = [read(p) for p in files[i * step : (i + 1) * step]]
        if len(group) == 1:
            return group[0]
        return {s.name: np.concatenate([g[s.name] for g in group], axis=0) for s in specs}

    def gen() -> Iterator[Any]:
        for i in range(n):
            yield lambda i=i: load(i)  # read only when this run is fed (lazily, and not at all by other shards)

    return DataSource(gen(), specs, f"data folder '{path}'", n)


def _random_source(
    specs: list[InputSpec], samples: int, batch_size: int, seed: int, input_shapes: Mapping[str, tuple[int, ...]]
) -> DataSource:
    shapes = {}
    dynamic_batch: set[str] = set()
    for spec in specs:
        _effective_batch(spec, batch_size, "random inputs")  # a fixed batch axis cannot take --batch-size
        if spec.name in input_shapes:
            shape = input_shapes[spec.name]
            if len(shape) != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, shape)
            ):
                raise UsageError(
                    f"--input-shape {spec.name}:{'x'.join(map(str, shape))} does not fit the model's input shape "
                    f"{spec.shape_text()}"
                )
        else:
            dynamic = [(k, d) for k, d in enumerate(spec.shape) if not isinstance(d, int)]
            if dynamic:
                k, d = dynamic[0]
                name = f"'{d}'" if d else "unnamed"
                if k == 0 and len(dynamic) == 1:
                    shape = (batch_size,) + tuple(spec.shape[1:])  # a dynamic batch axis takes the batch size
                    dynamic_batch.add(spec.name)
                else:
                    example = "x".join(str(x) if isinstance(x, int) else "N" for x in spec.shape)
                    raise UsageError(
                        f"input '{spec.name}' has a dynamic dimension {name} (axis {k}) and no data was given; "
                        f"pass --input-shape {spec.name}:{example} with N replaced, or --data"
                    )
            else:
                shape = tuple(spec.shape)  # type: ignore[arg-type]
        shapes[spec.name] = tuple(int(d) for d in shape)
    _check_random_size(specs, shapes, dynamic_batch, min(batch_size, samples))

    def gen() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        done = 0
        while done < samples:
            # a run holds batch_size samples along a dynamic batch axis (fewer in the last run)
            take = min(batch_size, samples - done) if dynamic_batch else 1
            done += take
            batch = {}
            for spec in specs:
                shape = shapes[spec.name]
                if spec.name in dynamic_batch:
                    shape = (take,) + shape[1:]
                if spec.dtype.kind == "f":
                    batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.dtype.kind == "b":
                    batch[spec.name] = rng.random(shape) < 0.5
                else:
                    batch[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
            yield batch

    source = DataSource(gen(), specs, f"random inputs (seed {seed})", samples)
    source.random = True
    return source


#: random inputs of one run may take at most this many bytes (all inputs together): a typo in
#: --input-shape (x:100000x100000x1000) would otherwise allocate until the machine swaps
MAX_RANDOM_RUN_BYTES = 1 << 30


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover


def _check_random_size(
    specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]], dynamic_batch: set[str], batch: int
) -> None:
    total, parts = 0, []
    for spec in specs:
        shape = shapes[spec.name]
        if spec.name in dynamic_batch:
            shape = (batch,) + shape[1:]
        count = 1
        for d in shape:
            count *= d
        total += count * spec.dtype.itemsize
        parts.append(f"{spec.name}:{'x'.join(map(str, shape))}")
    if total > MAX_RANDOM_RUN_BYTES:
        raise UsageError(
            f"random inputs {', '.join(parts)} would take {_human(total)} per run ({total:,} bytes), more than the "
            f"{_human(MAX_RANDOM_RUN_BYTES)} qdiff allows; pass a smaller --input-shape or --batch-size, or real --data"
        )


def _samples_in(batch: Mapping[str, np.ndarray], specs: list[InputSpec]) -> int:
    """Samples in one run: the length of a dynamic batch axis, else one."""
    for spec in specs:
        if spec.shape and not isinstance(spec.shape[0], int):
            arr = batch[spec.name]
            return int(arr.shape[0]) if arr.ndim else 1
    return 1


def _validate(batch: Mapping[str, np.ndarray], specs: list[InputSpec], index: int, where: str) -> dict[str, np.ndarray]:
    _check_names(batch.keys(), specs, f"{where} (sample {index})")
    out = {}
    for spec in specs:
        arr = np.asarray(batch[spec.name])
        if arr.dtype != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind") and not (
                arr.dtype.kind in "iub" and spec.dtype.kind == "f"
            ):
                raise DataError(
                    f"{where}: input '{spec.name}' is {arr.dtype} but the model takes {spec.dtype}; convert the data"
                )
            arr = arr.astype(spec.dtype)
        if arr.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape)):
            raise DataError(
                f"{where}: sample {index} of input '{spec.name}' has shape {list(arr.shape)} but the model takes "
                f"{spec.shape_text()}"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.isfinite(arr).sum())
            raise DataError(
                f"{where}: sample {index} of input '{spec.name}' holds {bad} NaN/Inf value(s); clean the data first"
            )
        out[spec.name] = arr
    return out
