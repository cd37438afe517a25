"""The model store: models loaded from the repository or uploaded, by content id.

Repository layout (like Triton's): ``DIR/<name>/model.onnx`` plus an optional
``config.json`` / ``config.pbtxt`` (see `config.py`) and a labels file. A model is
identified by the hash of its bytes (and of its external data), so the same bytes
uploaded twice (or loaded under two names) are one model with several names. A name
denotes one model: the last one loaded or uploaded under it, except that an upload
cannot take the name of a repository entry.
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..datatypes import NUMPY_BY_DATATYPE, datatype_of
from ..errors import ID_PREFIX, AlreadyExists, Cancelled, InvalidArgument, NotFound, ResourceExhausted, shorten
from ..gen import vis_pb2
from ..graph.loading import TensorInfo, parse_model_files, prepare_model, tensor_infos
from ..graph.receptive_field import image_input
from ..runtime.sessions import Runtime, short_reason
from ..runtime.type_probe import complete_types
from .config import check_config_input, read_config_file, validate_config

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MAX_LABELS_BYTES = 16 << 20   # ~1 M class names of 16 characters; a 400 MiB labels file loaded whole
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")   # whole names only: fullmatch (a $ admits "name\n")


@dataclass
class LoadedModel:
    id: str
    names: list[str]
    source: str                      # "repository" or "upload"
    size_bytes: int
    proto: onnx.ModelProto           # prepared (see graph.loading.prepare_model)
    config: vis_pb2.ModelConfig
    labels: list[str] | None
    infos: dict[str, TensorInfo] = field(repr=False, default_factory=dict)
    # facts derived from the graph once (inspection, gradient support, ...), by name
    derived: dict = field(repr=False, default_factory=dict)
    graph_id: str = ""               # hash of the bytes alone: sessions are cached per graph

    def __post_init__(self):
        self.graph_id = self.graph_id or self.id

    def memo(self, key: str, compute):
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]

    def memo_per(self, table: str, key, compute, limit: int = 64):
        """compute() once per `key` in the table `table`, which keeps at most `limit` keys (it starts
        over when full): facts that depend on a request's value, such as the image size of a model
        whose size is free, of which a client could send without end."""
        values = self.memo(table, dict)
        value = values.get(key)
        if value is None:
            value = compute()
            if len(values) >= limit:
                values.clear()
            values[key] = value
        return value

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.proto.graph.input]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.proto.graph.output]

    @property
    def image_input(self) -> str:
        """The input that images go to: the configured one, else graph.receptive_field.image_input's
        choice (the first rank-4 float input with three channels, else the first of rank 4), else the first."""
        if self.config.input.name:
            return self.config.input.name
        found = self.memo("image_input", lambda: image_input(self.proto, self.infos))
        return found[0] if found is not None else self.input_names[0]

    def label(self, index: int) -> str | None:
        if not self.labels:
            return None
        i = index - self.config.label_offset
        return self.labels[i] if 0 <= i < len(self.labels) else None


def model_ids(data: bytes, config: vis_pb2.ModelConfig | None, labels: list[str] | None,
              external_digest: bytes = b"") -> tuple[str, str]:
    """(graph id, model id): the hash of the bytes, and of the bytes with their serving config.

    The same bytes uploaded twice are one model. The same bytes served with another
    config or labels (a second repository entry, an upload with a header) are another
    model, since images are preprocessed and classes named differently, but they share
    one parsed graph and its onnxruntime sessions (keyed by the graph id). A model's
    external data (`external_digest`, see graph.loading.ExternalData) is part of its graph:
    the same model.onnx beside other weight files is another graph.
    """
    h = hashlib.sha256(data)
    if external_digest:
        h.update(b"\0external\0" + external_digest)
    graph_id = ID_PREFIX + h.hexdigest()[:16]
    cfg = config.SerializeToString(deterministic=True) if config is not None else b""
    if not cfg and not labels:
        return graph_id, graph_id
    h.update(b"\0config\0" + cfg + b"\0labels\0" + "\n".join(labels or []).encode())
    return graph_id, ID_PREFIX + h.hexdigest()[:16]


def check_name(name: str, field: str = "name") -> str:
    """Repository / model names: a single path component, no traversal."""
    if not name or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(field, f"{shorten(name)} is not a valid model name: use letters, digits, '.', '_' or '-' "
                                     "(no path separators, no '..', not absolute)")
    return name


def _check_io_types(proto: onnx.ModelProto) -> None:
    """Inputs and outputs must be tensors with no empty or negative static dimension: a sequence
    or map (an sklearn ZipMap, a sequence input) or a zero-sized image has nothing to show, and
    accepted it would break every later call that describes the model (List, Inspect)."""
    initializers = {t.name for t in proto.graph.initializer}
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for v in values:
            if not v.type.HasField("tensor_type"):
                what = (v.type.WhichOneof("value") or "value of no type").replace("_type", "")
                article = "an" if what[0] in "aeiou" else "a"
                raise InvalidArgument("model", f"{kind} {v.name!r} is {article} {what}, not a tensor; "
                                               "vis-service serves models whose inputs and outputs are tensors")
            elem = v.type.tensor_type.elem_type
            if kind == "input" and v.name not in initializers and not _carried(elem):
                raise InvalidArgument("model", f"input {v.name!r} is of ONNX type {onnx.TensorProto.DataType.Name(elem)}, "
                                               f"which requests cannot carry; allowed: {', '.join(NUMPY_BY_DATATYPE)}")
            dims = v.type.tensor_type.shape.dim if v.type.tensor_type.HasField("shape") else []
            bad = [d.dim_value for d in dims if d.HasField("dim_value") and d.dim_value <= 0]
            if bad:
                shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
                raise InvalidArgument("model", f"{kind} {v.name!r} has shape {shape}: static dimensions must be >= 1")


def _carried(elem_type: int) -> bool:
    """Whether a tensor of this ONNX type can travel in a request or a result (KServe datatypes)."""
    try:
        datatype_of(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (TypeError, ValueError, KeyError):
        return False
    return True


class ModelStore:
    def __init__(self, runtime: Runtime, repository: Path | None = None, max_model_bytes: int = 1 << 30,
                 max_loaded_bytes: int = 0):
        """`max_loaded_bytes` > 0: the models loaded at once may add up to that many bytes of model files
        (each keeps its parsed graph: ~2x its bytes in memory); a model past it is RESOURCE_EXHAUSTED."""
        self.runtime = runtime
        self.repository = Path(repository).resolve() if repository else None
        self.max_model_bytes = int(max_model_bytes)
        self.max_loaded_bytes = max(0, int(max_loaded_bytes))
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.RLock()
        # One model is parsed, prepared and given its first session at a time: each holds several
        # copies of its bytes on the way (protobuf, shape inference, onnxruntime), so concurrent
        # uploads of large models would multiply the peak (a 327 MB model peaks at ~2.7 GB).
        self._build_lock = threading.Lock()

    # -- lookup -------------------------------------------------------------
    def get(self, ref: str, field: str = "model") -> LoadedModel:
        """A loaded model by id or name; a repository name not loaded yet is loaded now."""
        model = self.find(ref, field)
        if model is not None:
            return model
        if ref in self.repository_names():  # repository models load on first use
            return self.load(ref)
        raise NotFound("model", ref, self._known())

    def find(self, ref: str, field: str = "model") -> LoadedModel | None:
        """A loaded model by id or name, or None (nothing is loaded)."""
        if not ref:
            raise InvalidArgument(field, "empty; give a model id or name (see ModelService.List)")
        with self._lock:
            if ref in self._models:
                return self._models[ref]
            return next((m for m in self._models.values() if ref in m.names), None)

    def _known(self) -> list[str]:
        with self._lock:
            known = [m.id for m in self._models.values()] + [n for m in self._models.values() for n in m.names]
        return known + [n for n in self.repository_names() if n not in known]

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def _loaded_names(self) -> list[str]:
        with self._lock:
            return [n for m in self._models.values() for n in m.names]

    def repository_names(self) -> list[str]:
        if self.repository is None or not self.repository.is_dir():
            return []
        return sorted(p.name for p in self.repository.iterdir()
                      if p.is_dir() and NAME_RE.fullmatch(p.name) and (p / MODEL_FILE).is_file())

    # -- loading ------------------------------------------------------------
    def load(self, name: str, cancelled=None) -> LoadedModel:
        """Load DIR/<name>/model.onnx; never reads outside the repository. `cancelled`: see _add."""
        check_name(name)
        if self.repository is None:
            raise NotFound("model", name, self._loaded_names())
        model_dir = (self.repository / name).resolve()
        path = model_dir / MODEL_FILE
        if model_dir.parent != self.repository:
            raise InvalidArgument("name", f"{name!r} resolves outside the model repository; refused")
        if not path.is_file():  # a typo of an uploaded model's name is suggested too (the name itself is not)
            raise NotFound("model", name, [n for n in self.repository_names() + self._loaded_names() if n != name])
        real = path.resolve()
        if real.parent != model_dir:
            raise InvalidArgument("name", f"{name}/{MODEL_FILE} is a link out of the model directory; refused")
        size = real.stat().st_size
        self._check_size(size)
        data = real.read_bytes()
        config = read_config_file(model_dir)
        labels = self._read_labels(model_dir, config)
        # parsed before the id is known: the id covers the external data, which is read (and
        # confined to the model directory) on every load, whatever is loaded already
        with self._build_lock:
            parsed, external = parse_model_files(data, base_dir=model_dir, max_model_bytes=self.max_model_bytes)
            self._check_size(size + external.size_bytes)
            return self._add(data, name, config, labels, source="repository", parsed=parsed,
                             external_digest=external.digest, cancelled=cancelled)

    def upload(self, data: bytes | bytearray, name: str = "", config: vis_pb2.ModelConfig | None = None,
               labels: list[str] | None = None, cancelled=None) -> LoadedModel:
        self._check_size(len(data))
        if name:
            check_name(name, "header.name")
            if name in self.repository_names():
                raise AlreadyExists(f"header.name: {name!r} is the name of a model repository entry; "
                                    "upload under another name")
        for i, label in enumerate(labels or ()):
            if "\n" in label or "\r" in label:   # a labels file's line each, as a repository entry's
                raise InvalidArgument(f"header.labels[{i}]", f"{shorten(label)} holds a line break; one line each")
        cfg = vis_pb2.ModelConfig()
        if config is not None:
            cfg.CopyFrom(config)
        validate_config(cfg, "header.config")
        if cfg.labels and (not labels or Path(cfg.labels).name != cfg.labels or cfg.labels in (".", "..")):
            # a repository entry's labels file; an upload has no files: its labels come in header.labels
            # (the name may stay, so that the same config uploaded gives the repository model's id)
            raise InvalidArgument("header.config.labels", f"{shorten(cfg.labels)} names a labels file, which an "
                                  "upload does not have: send the labels in header.labels (with a plain file name "
                                  "here, or none)")
        with self._build_lock:
            return self._add(data, name, cfg, list(labels) if labels else None, source="upload",
                             config_field="header.config", cancelled=cancelled)

    def unload(self, ref: str) -> bool:
        """True if `ref` was loaded and is no longer; False for a repository entry not loaded
        (unloading never loads it); NOT_FOUND for a name nothing has."""
        model = self.find(ref)
        if model is None:
            if ref in self.repository_names():
                return False
            raise NotFound("model", ref, self._known())
        with self._lock:
            self._models.pop(model.id, None)
            shared = any(m.graph_id == model.graph_id for m in self._models.values())
        if not shared:
            self.runtime.evict_model(model.graph_id)
        return True

    # -- internals ----------------------------------------------------------
    def loaded_bytes(self) -> int:
        """The loaded models' file bytes, once per distinct graph (configs of one graph share it)."""
        with self._lock:
            return sum({m.graph_id: m.size_bytes for m in self._models.values()}.values())

    def _check_loaded_bytes(self, size: int) -> None:
        """RESOURCE_EXHAUSTED where a new graph of `size` bytes would take the loaded models past
        max_loaded_bytes (distinct uploads stayed loaded without bound: ten of 1 GiB, the default upload
        limit, outgrew a 24 GB machine; re-uploads under one name keep the old version by its id)."""
        if not self.max_loaded_bytes:
            return
        held = self.loaded_bytes()
        if held + size > self.max_loaded_bytes:
            raise ResourceExhausted(f"model: loading {size} more bytes of model would take the models "
                                    f"loaded ({held} bytes) past the limit of {self.max_loaded_bytes} bytes "
                                    "(--max-loaded-mb); unload some first (ModelService.Unload, the client's unload())")

    def _check_size(self, size: int) -> None:
        if size > self.max_model_bytes:
            raise ResourceExhausted(f"model of {size} bytes exceeds the limit of {self.max_model_bytes} bytes "
                                    "(--max-upload-mb)")

    def _read_labels(self, model_dir: Path, config: vis_pb2.ModelConfig) -> list[str] | None:
        fname = config.labels or ("labels.txt" if (model_dir / "labels.txt").is_file() else "")
        if not fname:
            return None
        path = (model_dir / fname).resolve()
        if path.parent != model_dir and model_dir not in path.parents:
            raise InvalidArgument("config.labels", f"labels file {fname!r} is outside the model directory; refused")
        if not path.is_file():
            raise InvalidArgument("config.labels", f"labels file {fname!r} does not exist")
        if path.stat().st_size > MAX_LABELS_BYTES:
            raise ResourceExhausted(f"config.labels: labels file {fname!r} of {path.stat().st_size} bytes exceeds the "
                                    f"limit of {MAX_LABELS_BYTES} bytes")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument("config.labels", f"labels file {fname!r} is not UTF-8 text (byte {exc.start})") from None
        # line k is class k (+ label_offset): a blank line is a class without a name, and only "\n"
        # ends a line (str.splitlines also split at U+2028, form feeds, ...: a blank line or such a
        # character moved every later class's name); blank lines at the end are no classes
        lines = [line.rstrip("\r") for line in text.split("\n")]
        while lines and not lines[-1].strip():
            lines.pop()
        return lines

    def _add(self, data: bytes | bytearray, name: str, config, labels, *, source: str, parsed: onnx.ModelProto | None = None,
             external_digest: bytes = b"", config_field: str = "config", cancelled=None) -> LoadedModel:
        """`cancelled()`: the caller has gone (a deadline, a cancel): checked between the steps that
        take long on a large model, and before the model is registered for a call that failed."""
        def check():
            if cancelled is not None and cancelled():
                raise Cancelled("cancelled by the client; the model was not loaded")

        graph_id, mid = model_ids(data, config, labels, external_digest)
        self.runtime.revive_model(graph_id)   # unloaded before: its sessions may be cached again
        with self._lock:
            existing = self._models.get(mid)
            if existing is not None:
                self._bind_name(existing, name)
                return existing
            twin = next((m for m in self._models.values() if m.graph_id == graph_id), None)
        if twin is not None:  # same graph under another config: share the parsed graph and its sessions
            proto, infos = twin.proto, twin.infos
        else:
            self._check_loaded_bytes(len(data))
            parsed = parsed if parsed is not None else parse_model_files(data)[0]
            check()
            proto = complete_types(prepare_model(parsed))
            infos = tensor_infos(proto)
        check()
        _check_io_types(proto)
        model = LoadedModel(mid, [], source, len(data), proto, config, labels, infos, graph_id=graph_id)
        if model.config.input.name and model.config.input.name not in model.input_names:
            raise InvalidArgument(f"{config_field}.input.name", f"{model.config.input.name!r} is not an input of the model; inputs: {model.input_names}")
        image_input = model.infos.get(model.image_input)
        check_config_input(model.config, model.image_input, image_input.shape if image_input else None, config_field)
        # Validation by onnxruntime itself, and the forward session every request needs anyway.
        try:
            self.runtime.session(graph_id, ("forward",), lambda: (proto, None))
        except ResourceExhausted as exc:   # its constant folding past the run memory's bound
            raise ResourceExhausted(f"model: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            # its own words, without the status prefix and C++ source locations (short_reason)
            raise InvalidArgument("model", f"onnxruntime cannot load the model: {short_reason(exc)[1]}") from None
        check()
        with self._lock:
            existing = self._models.setdefault(mid, model)
            self._bind_name(existing, name)
        log.info("loaded model %s (%s) from %s", mid, ", ".join(existing.names) or "unnamed", source)
        return existing

    def _bind_name(self, model: LoadedModel, name: str) -> None:
        """`name` denotes `model` from now on; another model holding it loses it (a re-upload
        under the same name, e.g. after retraining, takes the name; the old model keeps its id)."""
        if not name:
            return
        with self._lock:
            for other in self._models.values():
                if other is not model and name in other.names:
                    other.names.remove(name)
                    log.info("name %r moved from model %s to %s", name, other.id, model.id)
            if name not in model.names:
                model.names.append(name)
