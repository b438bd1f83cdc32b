"""Reference ALIGNN weights (a PyTorch `state_dict` `.pt`) as Flax variables, without PyTorch.

A `.pt` written by `torch.save` (zip format, PyTorch >= 1.6) is a zip archive holding
`<name>/data.pkl` (the pickled dict; tensors refer to storages by key) and one raw little-endian
file per storage, `<name>/data/<key>`. `read_state_dict` unpickles `data.pkl` with an Unpickler
that resolves only `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
`torch._utils._rebuild_parameter` and the typed storage classes, so a file cannot run code;
anything else is refused with `pickle.UnpicklingError` naming the global.

`load_alignn_state_dict` maps the reference's names onto `alignn.ALIGNN`'s variables:
Linear weight [out, in] -> Dense kernel [in, out] (transposed), bias -> bias; BatchNorm1d
weight/bias -> scale/bias (params), running_mean/running_var -> mean/var (batch_stats).
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jraph
import numpy as np

from scannet_jax.alignn import ALIGNN, AlignnConfig

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands for `torch.<X>Storage` in the pickle: only its dtype matters."""

    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_unused) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])`."""
    if not size:
        return np.array(storage[offset])
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive = archive
        self._root = root

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        raw = self._archive.read(f"{self._root}/data/{key}")
        return np.frombuffer(raw, storage_type.dtype.newbyteorder("<"), count=numel)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d state_dict (zip format) into NumPy arrays, without torch.

    Raises:
      ValueError: not a zip-format `.pt`, big-endian data, or not a dict of tensors.
      pickle.UnpicklingError: the pickle asks for anything but tensors and ordered dicts.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a zip-format torch file (legacy torch.save format is not supported)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one <name>/data.pkl in the archive, found {pickles}")
        root = pickles[0].split("/")[0]
        if f"{root}/byteorder" in archive.namelist() and archive.read(f"{root}/byteorder") != b"little":
            raise ValueError(f"{path}: big-endian tensors are not supported")
        with archive.open(pickles[0]) as f:
            state = _RestrictedUnpickler(f, archive, root).load()
    if not isinstance(state, Mapping) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return dict(state)


def _torch_prefix(module_path: tuple[str, ...]) -> str:
    """Flax module path -> the reference's module name, e.g. ('edge_embedding_0', 'linear')
    -> 'edge_embedding.1.layer.0', ('alignn_layers_2', 'node_update', 'bn_nodes') -> the same
    dotted."""
    top, rest = module_path[0], list(module_path[1:])
    if match := re.fullmatch(r"(edge|angle)_embedding_(\d+)", top):
        top = f"{match[1]}_embedding.{int(match[2]) + 1}"
    elif match := re.fullmatch(r"(alignn_layers|gcn_layers)_(\d+)", top):
        top = f"{match[1]}.{match[2]}"
    if rest and rest[-1] in ("linear", "norm"):  # MLPLayer's nn.Sequential
        rest = ["layer", "0" if rest[-1] == "linear" else "1"]
    return ".".join([top, *rest])


_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "bias"): "bias", ("params", "scale"): "weight",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def torch_names(config: AlignnConfig = AlignnConfig()) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """The reference state_dict names of `ALIGNN(config)`'s variables.

    Returns:
      {torch name: (collection, Flax path, Flax shape)}; `num_batches_tracked` and the RBF
      `centers` buffers have no Flax counterpart and are not listed.
    """
    shapes = _variable_shapes(config)
    names = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in flax.traverse_util.flatten_dict(shapes[collection]).items():
            names[f"{_torch_prefix(path[:-1])}.{_LEAF_NAMES[(collection, path[-1])]}"] = (
                collection, path, tuple(leaf.shape))
    return names


def _variable_shapes(config: AlignnConfig) -> dict[str, Any]:
    graphs = jraph.GraphsTuple(nodes={"atomic_numbers": np.zeros(2, np.int32)},
                               edges={"distances": np.ones(1, np.float32)},
                               senders=np.zeros(1, np.int32), receivers=np.zeros(1, np.int32),
                               n_node=np.array([1, 1], np.int32), n_edge=np.array([1, 0], np.int32), globals=None)
    line = jraph.GraphsTuple(nodes=None, edges={"cosines": np.ones(1, np.float32)},
                             senders=np.zeros(1, np.int32), receivers=np.zeros(1, np.int32),
                             n_node=np.array([1, 0], np.int32), n_edge=np.array([1, 0], np.int32), globals=None)
    init = jax.eval_shape(lambda: ALIGNN(config).init(jax.random.PRNGKey(0), graphs, line, train=False))
    return flax.core.unfreeze(init)


def alignn_variables_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                     config: AlignnConfig = AlignnConfig()) -> dict[str, Any]:
    """Maps a reference state_dict (name -> array) onto `ALIGNN(config)`'s variables.

    Returns:
      {"params": ..., "batch_stats": ...} (float32), ready for `ALIGNN(config).apply`.

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped name (with both shapes), and
        RBF centres that differ from the model's.
    """
    expected = torch_names(config)
    ignored = {k for k in state_dict if k.endswith(".num_batches_tracked") or k.endswith(".centers")}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected) - ignored)
    problems = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in extra]
    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for name, (collection, path, shape) in expected.items():
        if name not in state_dict:
            continue
        value = np.asarray(state_dict[name], np.float32)
        if path[-1] == "kernel":
            value = value.T
        if value.shape != shape:
            torch_shape = tuple(np.shape(state_dict[name]))
            expected_shape = shape[::-1] if path[-1] == "kernel" else shape
            problems.append(f"shape of {name}: {torch_shape}, expected {expected_shape}")
            continue
        flat[collection][path] = value
    for name, bins, lo, hi in (("edge_embedding.0.centers", config.edge_input_features, 0.0, 8.0),
                               ("angle_embedding.0.centers", config.triplet_input_features, -1.0, 1.0)):
        if name in state_dict and not np.allclose(state_dict[name], np.linspace(lo, hi, bins), atol=1e-5):
            problems.append(f"{name}: not linspace({lo}, {hi}, {bins})")
    if problems:
        raise ValueError("state_dict does not fit ALIGNN(" + repr(config) + "):\n  " + "\n  ".join(problems))
    return {c: flax.traverse_util.unflatten_dict(v) for c, v in flat.items()}


def load_alignn_state_dict(path: str | Path, config: AlignnConfig = AlignnConfig()) -> dict[str, Any]:
    """Reads a reference ALIGNN `.pt` state_dict into Flax variables ({"params", "batch_stats"}).

    Args:
      path: a file written by `torch.save(model.state_dict(), path)`.
      config: the architecture it belongs to (the reference's ALIGNNConfig fields).

    Raises:
      ValueError, pickle.UnpicklingError: as `read_state_dict` and `alignn_variables_from_state_dict`.
    """
    return alignn_variables_from_state_dict(read_state_dict(path), config)
