"""The run spec: everything one job needs, resolved from the config once, as typed frozen dataclasses.

:mod:`mmrepro.config` builds a :class:`RunSpec` per training or adaptation job (and a
:class:`MechanismSpec` per mechanisms point); the rules pass it to ``mmrepro`` as a JSON file
(:func:`mmrepro.config.spec_file`) and the job writes it beside its results (``config.json``). :meth:`RunSpec.from_dict` reads that JSON back
and checks every key's type on construction, so a misspelt or mistyped key fails with its name
before any work, not as a ``KeyError`` inside a job. The JSON has the shape it had when the spec
was a dict: ``config.json`` files of finished runs still load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from mmrepro.annotations import describe, fits


class SpecError(ValueError):
    """A run spec that does not hold what a job reads; the message names the key."""


#: Field metadata: the spec's JSON leaves the field out while it holds its default, so that a key
#: added later changes neither the JSON of the runs that do not use it nor Snakemake's view of them.
OMITTED_AT_DEFAULT = {"omit_at_default": True}


def _omitted(f: dataclasses.Field, value: Any) -> bool:
    return bool(f.metadata.get("omit_at_default")) and value == f.default


@dataclass(frozen=True)
class MethodPlan:
    """Which plug-in of each family a run uses."""

    transform: str
    hook: str
    adapter: str

    def families(self) -> dict[str, str]:
        """Family -> plug-in name, in the order the families are listed."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class DataSetting:
    """The data setting a run trains or is scored under: its registered ``type`` and constructor ``params``."""

    type: str
    params: dict[str, Any]


@dataclass(frozen=True)
class ModelSpec:
    """The model keys of a run (config ``model``, merged per study, dataset and backbone): the
    arguments of :func:`mmrepro.models.build.build_model`."""

    backbone: str
    d_model: int
    layers: int
    heads: int
    kernel: int
    dropout: float
    fusion_layers: int
    dropouts: dict[str, float | None]
    causal: bool | None
    position_padding: bool
    resnet: int
    resnet_width: int


    def architecture(self) -> dict[str, Any]:
        """The keys that shape the module tree and its forward pass (all but the dropout rates):
        what a checkpoint of this model must have been built with."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("dropout", "dropouts")}


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """The training keys of a run (config ``train``): what :func:`mmrepro.train.fit` reads. The
    fields are in the config's order, which is the order of the spec's JSON."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    patience: int = 5
    clip: float | None = 1.0
    min_delta: float = 0.0  # a validation loss must fall by more than this to count as an improvement
    #: False: the training split in stored order every epoch (CGGM's, CASP's and MPLMM's released code)
    shuffle: bool = field(default=True, metadata=OMITTED_AT_DEFAULT)
    #: which epoch's weights a run keeps: mmrepro.train.SELECTIONS
    selection: str = field(default="valid_loss", metadata=OMITTED_AT_DEFAULT)
    device: str = "auto"
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"
    when: int = 10  # plateau: epochs without improvement before the rate drops
    factor: float = 0.1  # plateau: the drop
    warmup_epochs: int = 0  # cosine
    warmup_lr: float = 0.0  # cosine: rate of the first warm-up epoch
    min_lr: float = 0.0  # cosine: rate of the last epoch
    precision: str = "fp32"  # "bf16": forward passes under bfloat16 autocast (losses in float32)
    pin_memory: bool = True  # CUDA: batches go to the GPU through page-locked memory, asynchronously
    slices: dict[str, Any] | None = None  # 2-D slice sampling of volumes: read by the loaders (jobs.RunData), not here
    #: at most this many optimizer steps per epoch (None: the whole split): rehearsals and cost measurements
    max_steps: int | None = field(default=None, metadata=OMITTED_AT_DEFAULT)

    @property
    def torch_device(self) -> str:
        import torch  # here: a spec is read by jobs that never train (tracking)

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def autocast(self):
        """The forward pass's precision context (a no-op at fp32)."""
        import torch

        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        return torch.autocast(torch.device(self.torch_device).type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")


@dataclass(frozen=True)
class TrackingSpec:
    """Where a run is logged: the config's ``tracking.uri`` (None: the results folder's sqlite store) and ``mode``."""

    uri: str | None
    mode: str = "auto"


@dataclass(frozen=True)
class CheckpointSpec:
    """The model a job starts from, as its ``model.pt`` must record it: the model keys it was built
    with, the task it was trained on and the model transform applied to it (a fine-tuning run's
    backbone; an adapting run's trained model, a backbone or another study's run)."""

    model: ModelSpec
    task: str
    transform: str


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything one training or adaptation job needs (see :func:`mmrepro.config.run_spec`).

    ``backbone``: the run's name on an adapting study's backbone axis (None off the axis);
    ``teachers``: modality -> setting of the unimodal run a distilling hook learns from;
    ``feature_stats``: save the source feature statistics (a backbone job, for SSA);
    ``method_params``: plug-in name -> the parameters its constructor receives;
    ``tuned_on_target_labels``: the parameters come from a search scored on a target's labelled
    validation split (a cross-dataset setting's), so the run is marked ``target_labels_used``;
    ``stand_in``: the scale of the random stand-in files the run's data was converted from (None: the
    real data), so that its metrics, MLflow run and every table built from it say it is no result.
    ``checkpoint``: the model the job loads and starts from (None: it trains from scratch).
    """

    study: str
    dataset: str
    backbone: str | None = field(default=None, metadata=OMITTED_AT_DEFAULT)  # absent off the backbone axis
    method: str
    setting: str
    seed: int
    task: str
    plan: MethodPlan
    method_params: dict[str, dict[str, Any]]
    data_setting: DataSetting
    model: ModelSpec
    train: TrainConfig
    utilisation_probes: bool
    feature_stats: bool = False
    tracking: TrackingSpec
    results: str
    teachers: dict[str, str] | None = field(default=None, metadata=OMITTED_AT_DEFAULT)  # absent without teachers
    tuned_on_target_labels: bool = field(default=False, metadata=OMITTED_AT_DEFAULT)
    stand_in: str | None = field(default=None, metadata=OMITTED_AT_DEFAULT)
    checkpoint: CheckpointSpec | None = field(default=None, metadata=OMITTED_AT_DEFAULT)  # from scratch

    def __post_init__(self) -> None:
        _check_types(self, "")
        for name in self.plan.families().values():
            if name not in self.method_params:
                raise SpecError(f"spec key method_params: no entry for plug-in {name!r} of plan {self.plan}")

    # --- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The spec as the JSON object the rules pass and ``config.json`` holds (the dict of old)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "tracking":
                out.update(tracking_uri=value.uri, tracking_mode=value.mode)
            elif not _omitted(f, value):
                out[f.name] = _plain(value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        """A spec from its JSON object; unknown or missing keys and wrong types raise :class:`SpecError`."""
        _check_object(data, "")
        data = dict(data)
        tracking = {k: data.pop(f"tracking_{k}") for k in ("uri", "mode") if f"tracking_{k}" in data}
        if "uri" not in tracking:
            raise SpecError("spec key tracking_uri: missing")
        data["tracking"] = tracking
        return _build(cls, data, "")

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.from_dict(_parse(text))

    # --- what a search varies -------------------------------------------------------------------

    def space_field(self, key: str) -> tuple[str, str, str | None]:
        """Where a search-space key points: ``(section, field, plug-in)``; a ``KeyError`` names what
        the key may be."""
        parts = key.split(".")
        sections = {"train": self.train, "model": self.model}
        if len(parts) == 2 and parts[0] in sections and parts[1] in _field_names(sections[parts[0]]):
            return parts[0], parts[1], None
        if len(parts) == 3 and parts[0] == "methods" and parts[1] in self.plan.families().values():
            return "methods", parts[2], parts[1]
        raise KeyError(f"{key!r} is not train.<key>, model.<key> or methods.<plug-in of {self.method!r}>.<param>")

    def with_params(self, params: dict[str, Any]) -> RunSpec:
        """A copy with the searched ``params`` (space keys -> values) set, each along its path."""
        out = self
        for key, value in params.items():
            section, name, plugin = out.space_field(key)
            if plugin is not None:
                out = dataclasses.replace(out, method_params={**out.method_params,
                                                              plugin: {**out.method_params[plugin], name: value}})
            else:
                out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **{name: value})})
        return out


@dataclass(frozen=True, kw_only=True)
class MechanismSpec:
    """What one mechanisms point needs (see :func:`mmrepro.config.mechanism_spec`): its synth dataset's
    config entry, the sweep's dose, seed, budget (:class:`mmrepro.mechanisms.Budget` keys), the
    methods compared with their parameters, and the target domain (shift)."""

    study: str
    dataset: dict[str, Any]
    dose: float
    seed: int
    budget: dict[str, Any]
    methods: list[str]
    params: dict[str, dict[str, Any]]
    domain: str | None = None

    def __post_init__(self) -> None:
        _check_types(self, "")

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> MechanismSpec:
        return _build(cls, _parse(text), "")


# --- construction and checks ------------------------------------------------------------------------

def _field_names(cls_or_obj) -> list[str]:
    return [f.name for f in dataclasses.fields(cls_or_obj)]


@functools.cache
def _hints(cls) -> dict[str, Any]:
    """``cls``'s resolved annotations, once per class: ``get_type_hints`` evaluates every string annotation
    again on each call, and per spec it was a third of the time Snakemake takes to read the workflow
    on paper.yaml (which every SLURM job does again). Callers only read the dict."""
    return typing.get_type_hints(cls)


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"not valid JSON: {e}") from None


def _check_object(data: Any, prefix: str) -> None:
    if not isinstance(data, dict):
        raise SpecError(f"spec key {prefix.rstrip('.') or '<top level>'}: expected a JSON object, got {data!r}")


def _build(cls, data: dict[str, Any], prefix: str):
    """``cls`` from a JSON object, its dataclass fields built from their sub-objects."""
    _check_object(data, prefix)
    names = _field_names(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        raise SpecError(f"spec key {prefix}{unknown[0]}: unknown; known: {names}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"spec key {prefix}{f.name}: missing")
            continue
        value, hint = data[f.name], _hints(cls)[f.name]
        nested = next((arm for arm in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(arm)), None)
        if nested is not None and value is not None:
            value = _build(nested, value, f"{prefix}{f.name}.")
        kwargs[f.name] = value
    return cls(**kwargs)


def _check_types(obj, prefix: str) -> None:
    """Every field of ``obj`` (and of its dataclass fields) holds a value of its annotated type."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if not fits(value, hints[f.name]):
            raise SpecError(f"spec key {key}: expected {describe(hints[f.name])}, got {value!r}")
        if dataclasses.is_dataclass(value):
            _check_types(value, key + ".")


def _plain(value: Any) -> Any:
    """A dataclass as a JSON object in field order (dicts and lists copied; see :data:`OMITTED_AT_DEFAULT`)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not _omitted(f, getattr(value, f.name))}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
