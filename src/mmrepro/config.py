"""The workflow config: validation against the JSON schema, registry checks, and per-job run specs.

The Snakefile calls :func:`validate_config` once at parse time, so a bad config fails before any
job starts, with a message that names the offending key. Jobs then receive a *run spec*: the
small, fully resolved slice of the config one job needs (built here, never in rules).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import logging
import math
import os
import typing
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mmrepro.data import dataset_modalities
from mmrepro.annotations import numeric_kind, problem
from mmrepro.methods.params import ParamError, check_params, declared
from mmrepro.methods.registry import ADAPTERS, HOOKS, METHOD_FAMILIES, SETTINGS, TRANSFORMS, build, resolve_method
from mmrepro.models.fusion import FUSIONS
from mmrepro.models.presets import JOINT_PRESETS, PRESETS, check_widths, preset_dropouts
from mmrepro.models.segmentation import SEGMENTATION_BACKBONES, check_method_support
from mmrepro.spec import CheckpointSpec, DataSetting, MechanismSpec, ModelSpec, RunSpec, TrackingSpec, TrainConfig
from mmrepro.tracking import config_hash

#: Loaders whose task is per-voxel segmentation (a model and method subset of their own).
SEGMENTATION_LOADERS = ("brats",)

#: How each study produces its runs: trained per (method, setting), or a source model adapted at test time.
STUDY_KINDS = {"balance": "train", "missing": "finetune", "peft": "finetune", "shift": "adapt"}
#: Tracking experiments: one per study, plus one for the backbones that shift, peft and missing start from.
EXPERIMENTS = [*STUDY_KINDS, "backbones"]
#: The row each study's paired differences are taken against (report/paired.py), when the config names
#: none: the first of these the study runs. Missing: MPLMM's baselines from strongest to weakest by
#: its Table 1 average on CMU-MOSI (config/reference/missing.csv).
PAIRED_REFERENCES = {"balance": ["joint"], "shift": ["source_only"], "peft": ["full_finetune"],
                     "missing": ["mmin", "map", "mctn", "modality_dropout", "modality_substitution", "lower_bound"]}


log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config problem; the message starts with the config key it concerns."""


def _with_defaults(validator_class):
    """Extend a jsonschema validator so that ``default`` values fill missing properties."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def merge_config(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Layer ``update`` over ``base`` in place as Snakemake layers ``--configfile`` files: mappings
    merge key by key, anything else (lists included) is replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def read_config_file(path: Path | str) -> dict[str, Any]:
    """One YAML config file; a missing file, a YAML error (with its line and column) or a file that
    is not a mapping of keys raises :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.exists():
        hint = ""
        if path.suffix not in (".yaml", ".yml", ".json"):
            hint = (f"; {str(path)!r} looks like a target: Snakemake reads every word after --configfile as a "
                    f"config file, so put targets first (snakemake --cores all {path} --configfile <files>)")
        raise ConfigError(f"config file {path}: no such file{hint}")
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a folder, not a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"config file {path}{where}: not valid YAML: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected config keys (a YAML mapping) at the top level, "
                          f"got a {type(data).__name__}")
    return data


def read_config_files(paths: list[Path] | list[str]) -> dict[str, Any]:
    """Config files layered in order as Snakemake layers ``--configfile`` files (:func:`merge_config`)."""
    config: dict[str, Any] = {}
    for path in paths:
        merge_config(config, read_config_file(path))
    return config


def load_schema(path: Path | str) -> dict[str, Any]:
    """The config schema; its default path is relative to the repository root, where the verbs run."""
    if not Path(path).is_file():
        raise ConfigError(f"config schema {path} not found (from {Path.cwd()}): run from the repository root "
                          "or pass --schema <repository>/workflow/schemas/config.schema.yaml")
    # libyaml's loader where PyYAML has it: the pure-Python one took 0.4 s per load of this schema, and
    # the workflow loads it at every start (each SLURM job too)
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def validate_config(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults in place, check the schema, then names against the registries; return ``config``."""
    written = _study_sections(config)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"config key {_key(e.absolute_path)}: {e.message}" for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    for (study, section), keys in written.items():
        overrides = config["studies"][study][section]
        for key in [k for k in overrides if k not in keys]:
            del overrides[key]
    _check_finite(config)
    _check_folders(config)
    _check_methods(config)
    for note in select_study_datasets(config):
        log.warning("note: %s", note)
    _check_backbones(config, schema)
    _check_names(config)
    _check_mechanisms(config)
    _check_overrides(config, schema)
    _check_tune(config)
    _check_heads(config)
    _check_selection(config)
    return config


def _study_sections(config: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """The keys written in each study's ``model`` and ``train`` sections. Those sections override the
    top level's, key by key, so the schema's defaults must not fill them (a default there would hide
    the top level's value: ``train: {max_steps: 2}`` would not reach a study that sets its epochs)."""
    studies = config.get("studies")
    return {(study, section): set(cfg[section]) for study, cfg in (studies if isinstance(studies, dict) else {}).items()
            if isinstance(cfg, dict) for section in ("model", "train") if isinstance(cfg.get(section), dict)}


def select_study_datasets(config: dict[str, Any]) -> list[str]:
    """Cut each study's dataset-keyed entries to the datasets it runs, in place; return one note per cut.

    A user who holds some of the datasets lists those under ``studies.<study>.datasets`` (an overlay or
    ``--config``) and the rest of the study's grid follows: ``per_dataset`` entries, settings'
    ``datasets`` lists and ``report_groups`` that name a dataset the study does not run are skipped (a
    setting left with none runs nothing; a group loses nothing silently: it goes whole, since its row
    stands for all of its members). A name that is no dataset of the config stays an error.
    """
    notes = []

    def known(name: str, key: str) -> None:
        if name not in config["datasets"]:
            raise ConfigError(f"config key {key}: unknown dataset {name!r}; defined under datasets: "
                              f"{sorted(config['datasets'])}")

    for study, study_cfg in config["studies"].items():
        runs = study_cfg["datasets"]
        for name in list(study_cfg.get("per_dataset", {})):
            known(name, f"studies.{study}.per_dataset.{name}")
            if name not in runs:
                del study_cfg["per_dataset"][name]
                notes.append(f"studies.{study}.per_dataset.{name} skipped: the study does not run {name!r}")
        for setting, setting_cfg in study_cfg["settings"].items():
            listed = setting_cfg.get("datasets")
            for i, name in enumerate(listed or []):
                known(name, f"studies.{study}.settings.{setting}.datasets[{i}]")
            if listed and any(name not in runs for name in listed):
                setting_cfg["datasets"] = [name for name in listed if name in runs]
                notes.append(f"studies.{study}.settings.{setting}: skips {[n for n in listed if n not in runs]}, "
                             f"which the study does not run" + ("" if setting_cfg["datasets"] else "; the setting runs nothing"))
        for group, members in list(study_cfg.get("report_groups", {}).items()):
            for i, name in enumerate(members):
                known(name, f"studies.{study}.report_groups.{group}[{i}]")
            absent = [name for name in members if name not in runs]
            if absent:
                del study_cfg["report_groups"][group]
                notes.append(f"studies.{study}.report_groups.{group} skipped: the study does not run {absent}")
    return notes
def _check_folders(config: dict[str, Any]) -> None:
    """``results`` and ``data_root`` are folders (or not made yet): a file there, or on the way to
    them, would fail at the first job that writes."""
    for key in ("results", "data_root"):
        for path in (Path(config[key]), *Path(config[key]).parents):
            if path.exists():
                if not path.is_dir():
                    what = "is" if path == Path(config[key]) else f"is under {path}, which is"
                    raise ConfigError(f"config key {key}: {config[key]} {what} a file, not a folder; set {key} to "
                                      "a folder (it is created if absent)")
                break


def _check_finite(value: Any, path: tuple = ()) -> None:
    """NaN and infinity pass JSON-schema bounds (every comparison with NaN is false): refuse them."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, (*path, i))
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {_key(path)}: {value} is not a finite number")


def _check_heads(config: dict[str, Any]) -> None:
    """Attention splits d_model across heads: a remainder would fail only when the model is built
    (the segmentation U-Net has no attention)."""
    for study in config["studies"]:
        for ds in config["studies"][study]["datasets"]:
            if config["datasets"][ds]["loader"] in SEGMENTATION_LOADERS:
                continue
            for name in study_backbones(config, study) or [None]:
                model = model_config(config, study, ds, name)
                if model["d_model"] % model["heads"]:
                    raise ConfigError(f"config key {_model_key(config, study, ds, name, 'heads')}: d_model "
                                      f"{model['d_model']} is not divisible by heads {model['heads']}")


def _check_selection(config: dict[str, Any]) -> None:
    """``train.selection: valid_accuracy`` needs a label per sample: not on a segmentation dataset."""
    for study, study_cfg in config["studies"].items():
        for ds in study_cfg["datasets"]:
            selection = train_config(config, study, ds)["selection"]
            if selection == "valid_accuracy" and config["datasets"][ds]["loader"] in SEGMENTATION_LOADERS:
                raise ConfigError(f"config key {_train_key(config, study, ds, 'selection')}: valid_accuracy keeps "
                                  f"the epoch of the best accuracy per sample, but dataset {ds!r} of study {study!r} "
                                  "is segmented per voxel; use valid_loss there (studies.<study>.per_dataset)")


def _train_key(config: dict[str, Any], study: str, dataset: str, field: str) -> str:
    """The config key that sets a study's train ``field`` on ``dataset``: the most specific one holding it."""
    if field in _override(config, study, dataset).get("train", {}):
        return f"studies.{study}.per_dataset.{dataset}.train.{field}"
    if field in config["studies"][study].get("train", {}):
        return f"studies.{study}.train.{field}"
    return f"train.{field}"


def _check_overrides(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Per-dataset overrides: known datasets, and the merged model/train/method keys valid as if written whole."""
    registries = (TRANSFORMS, HOOKS, ADAPTERS)
    for study, study_cfg in config["studies"].items():
        for dataset, override in study_cfg["per_dataset"].items():
            key = f"studies.{study}.per_dataset.{dataset}"   # only the study's datasets: select_study_datasets
            for section, merged in (("model", model_config(config, study, dataset)),
                                    ("train", train_config(config, study, dataset))):
                _check_section(schema, section, merged, f"{key}.{section}")
            for name, params in override.get("methods", {}).items():
                owner = next((reg for reg in registries if name in reg), None)
                if owner is None:
                    raise ConfigError(f"config key {key}.methods.{name}: unknown method")
                _check_params(owner.get(name), method_params(config, study, dataset, name), f"{key}.methods.{name}",
                              build=owner is not ADAPTERS)


def _check_section(schema: dict[str, Any], section: str, merged: dict[str, Any], key: str) -> None:
    """A merged ``model`` or ``train`` section valid as if written whole (its defaults filled already)."""
    sub = {**schema["definitions"][section], "definitions": schema["definitions"]}
    for e in jsonschema.Draft202012Validator(sub).iter_errors(merged):
        raise ConfigError(f"config key {key}{'.' + _key(e.absolute_path) if e.absolute_path else ''}: {e.message}")


def study_backbones(config: dict[str, Any], study: str) -> dict[str, dict[str, Any]]:
    """An adapting study's backbone axis, name -> model keys over the study's model: its ``backbones``,
    else one backbone named after the study's ``model.backbone`` or, with ``source_model``, after the
    run it adapts (``<study>-<method>-<setting>``); ``{}`` for the studies that have no axis."""
    study_cfg = config["studies"][study]
    if STUDY_KINDS[study] != "adapt":
        return {}
    if study_cfg.get("backbones"):
        return study_cfg["backbones"]
    source = study_cfg.get("source_model")
    if source:
        return {"-".join(source[k] for k in ("study", "method", "setting")): {}}
    return {model_config(config, study)["backbone"]: {}}


def _check_backbones(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """``backbones``: an adapting study's, not combined with ``source_model`` (that study trains no
    backbone), each entry a valid model once merged; the names it picks are checked with every
    study's model (:func:`_check_backbone`)."""
    for study, study_cfg in config["studies"].items():
        if not study_cfg.get("backbones"):
            continue
        key = f"studies.{study}.backbones"
        if STUDY_KINDS[study] != "adapt":
            raise ConfigError(f"config key {key}: a backbone axis varies the source model a study adapts at test "
                              f"time (shift); {study!r} trains its own models")
        if study_cfg.get("source_model"):
            raise ConfigError(f"config key {key}: studies.{study}.source_model adapts a model another study "
                              f"trained, so there is no backbone to vary; set one of the two")
        for name in study_cfg["backbones"]:
            for ds in study_cfg["datasets"]:
                _check_section(schema, "model", model_config(config, study, ds, name), f"{key}.{name}")


def _model_key(config: dict[str, Any], study: str, dataset: str, backbone: str | None, field: str) -> str:
    """The config key that sets a study's model ``field`` on ``dataset``: the most specific one holding it."""
    if field in ((config["studies"][study].get("backbones") or {}).get(backbone) or {}):
        return f"studies.{study}.backbones.{backbone}.{field}"
    if field in _override(config, study, dataset).get("model", {}):
        return f"studies.{study}.per_dataset.{dataset}.model.{field}"
    return f"studies.{study}.model.{field}"


def _check_backbone(config: dict[str, Any], study: str, ds: str, name: str | None) -> None:
    """One model of a study on one dataset (``name``: of its backbone axis): a known backbone for the
    dataset's task, the 2-D one where slices are fed, a preset's dropouts and widths."""
    model = model_config(config, study, ds, name)
    backbone = model["backbone"]
    segmentation = config["datasets"][ds]["loader"] in SEGMENTATION_LOADERS
    known = [*FUSIONS, *PRESETS, *(SEGMENTATION_BACKBONES if segmentation else ())]
    if backbone not in known:
        raise ConfigError(f"config key {_model_key(config, study, ds, name, 'backbone')}: unknown backbone "
                          f"{backbone!r}; known: {sorted(known)}")
    if train_config(config, study, ds).get("slices") is not None and backbone != "deeplab2d":
        raise ConfigError(f"config key studies.{study} (dataset {ds}): train.slices feeds 2-D slices, which "
                          f"only the deeplab2d model reads, not {backbone!r}")
    if backbone in PRESETS and not segmentation:
        where = f"studies.{study}.backbones.{name}" if name in (config["studies"][study].get("backbones") or {}) \
            else f"studies.{study}"
        try:
            preset_dropouts(backbone, model.get("dropouts"))
            check_widths(backbone, model["d_model"], model["heads"])
        except ValueError as e:
            raise ConfigError(f"config key {where} (dataset {ds}): {e}") from None


def _check_adapters(config: dict[str, Any]) -> None:
    """An adapter that reads the source feature statistics a backbone job saves (SSA) cannot adapt a
    model another study trained (``source_model``): that run saved none."""
    for study, study_cfg in config["studies"].items():
        source = study_cfg.get("source_model") if STUDY_KINDS[study] == "adapt" else None
        for i, method in enumerate(study_cfg["methods"] if source else []):
            adapter = method_plan(config, method).adapter
            if ADAPTERS.get(adapter).needs_source_stats:
                raise ConfigError(f"config key studies.{study}.methods[{i}]: {adapter!r} needs the source feature "
                                  f"statistics a {study} backbone saves (feature_stats.pt), but studies.{study}."
                                  f"source_model adapts the {source['study']} study's {source['method']!r} runs, "
                                  f"which have none")


def _run_transform(config: dict[str, Any], study: str, run: dict[str, Any]):
    """A run's method plan and its transform, built with the run's parameters (variant overrides included)."""
    base, overrides = expand_variants(config, run["method"])
    plan = resolve_method(base)
    params = {**method_params(config, study, run["dataset"], plan.transform), **overrides.get(plan.transform, {})}
    return plan, build(TRANSFORMS, plan.transform, params)


def _check_model_requirements(config: dict[str, Any], study: str, run: dict[str, Any]) -> None:
    """A transform's ``requires_model`` keys have the values it needs in the run's model (e.g. MPLMM's
    zero prompts need ``position_padding: true``)."""
    plan, transform = _run_transform(config, study, run)
    model = model_config(config, study, run["dataset"], run.get("backbone"))
    for field, (value, why) in transform.requires_model.items():
        if model.get(field) != value:
            i = config["studies"][study]["methods"].index(run["method"])
            key = _model_key(config, study, run["dataset"], run.get("backbone"), field)
            raise ConfigError(f"config key {key}: must be {value} for {plan.transform!r} (studies.{study}.methods[{i}], "
                              f"dataset {run['dataset']!r}), got {model.get(field)}: {why}")


def _check_modality_layers(config: dict[str, Any], study: str, run: dict[str, Any]) -> None:
    """A method that adapts per-modality transformer encoders needs a backbone that has them."""
    backbone = model_config(config, study, run["dataset"], run.get("backbone"))["backbone"]
    if backbone not in JOINT_PRESETS:
        return
    plan, transform = _run_transform(config, study, run)
    for name, needs in ((plan.transform, transform.needs_modality_layers),
                        (plan.hook, HOOKS.get(plan.hook).needs_modality_layers)):
        if needs:
            i = config["studies"][study]["methods"].index(run["method"])
            raise ConfigError(f"config key studies.{study}.methods[{i}]: {name!r} adapts per-modality transformer "
                              f"encoders, but backbone {backbone!r} (dataset {run['dataset']!r}) has none: its "
                              f"transformer reads all modalities at once; use casp_late, cggm_msa or a light "
                              f"backbone, or limit the method with per_dataset / settings")


def _check_params(cls, params: dict[str, Any], key: str, build: bool = False) -> None:
    """Each parameter is one the plug-in declares, of its type and in its range
    (:mod:`mmrepro.methods.params`); with ``build``, the plug-in accepts them together too (its
    constructor checks combinations, e.g. CGGM's cls_momentum needs cls_optim SGD). Adapters need a
    model to be built: their declaration only."""
    try:
        check_params(cls, params)
    except ParamError as e:
        raise ConfigError(f"config key {key}.{e.param}: {e.problem}") from None
    if build:
        try:
            cls(**params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key {key}: {e}") from None


def _plugin(name: str):
    """The registered plug-in class of any family called ``name``, or None."""
    owner = next((reg for reg in METHOD_FAMILIES.values() if name in reg), None)
    return None if owner is None else (owner.get(name), owner is not ADAPTERS)


def _check_methods(config: dict[str, Any]) -> None:
    """Every ``methods.<plug-in>`` entry (used by a study or not: mechanisms sweeps read them too) and
    every ``method_variants.<name>.params``, over its plug-in's entry, as the plug-in declares."""
    for name, params in config["methods"].items():
        found = _plugin(name)
        if found is None:
            raise ConfigError(f"config key methods.{name}: unknown method; known: "
                              f"{sorted(n for reg in METHOD_FAMILIES.values() for n in reg.names())}")
        _check_params(found[0], params, f"methods.{name}", build=found[1])
    for name, variant in config.get("method_variants", {}).items():
        found = _plugin(variant["method"])
        if found is None:
            raise ConfigError(f"config key method_variants.{name}.method: {variant['method']!r} is not one "
                              "registered plug-in (a variant runs one plug-in with other parameters)")
        _check_params(found[0], {**config["methods"].get(variant["method"], {}), **variant.get("params", {})},
                      f"method_variants.{name}.params", build=found[1])


def _check_names(config: dict[str, Any]) -> None:
    registries = {"transform": TRANSFORMS, "hook": HOOKS, "adapter": ADAPTERS}
    for name, ds in config["datasets"].items():
        if ds["loader"] == "synth":
            names = [m["name"] for m in ds["synth"]["modalities"]]
            if len(set(names)) != len(names):
                raise ConfigError(f"config key datasets.{name}.synth.modalities: names repeat: {names}")
            for m in ds["synth"]["interaction"]["modalities"]:
                if m not in names:
                    raise ConfigError(f"config key datasets.{name}.synth.interaction.modalities: {m!r} is not one of {names}")
    for name, variant in config.get("method_variants", {}).items():
        try:
            resolve_method(variant["method"])  # also loads the registries
        except (KeyError, ValueError) as e:
            raise ConfigError(f"config key method_variants.{name}.method: {e.args[0]}") from None
        if any(name in reg for reg in registries.values()):
            raise ConfigError(f"config key method_variants.{name}: the name is a registered plug-in already")
    for study, study_cfg in config["studies"].items():
        for i, ds in enumerate(study_cfg["datasets"]):
            if ds not in config["datasets"]:
                raise ConfigError(f"config key studies.{study}.datasets[{i}]: unknown dataset {ds!r}; "
                                  f"defined under datasets: {sorted(config['datasets'])}")
        for group, members in study_cfg["report_groups"].items():
            key = f"studies.{study}.report_groups.{group}"
            if group in study_cfg["datasets"]:
                raise ConfigError(f"config key {key}: the group's name is one of the study's datasets; its rows "
                                  "would be mistaken for that dataset's")
        if study_cfg["paired_with"] is not None and study_cfg["paired_with"] not in study_cfg["methods"]:
            raise ConfigError(f"config key studies.{study}.paired_with: {study_cfg['paired_with']!r} is not one of the "
                              f"study's methods {study_cfg['methods']}")
        source = study_cfg.get("pretrain_dataset")
        if source is not None and source not in config["datasets"]:
            raise ConfigError(f"config key studies.{study}.pretrain_dataset: unknown dataset {source!r}; "
                              f"defined under datasets: {sorted(config['datasets'])}")
        for i, method in enumerate(study_cfg["methods"]):
            try:
                resolve_method(expand_variants(config, method)[0])
            except (KeyError, ValueError) as e:
                raise ConfigError(f"config key studies.{study}.methods[{i}]: {e.args[0]}") from None
        for name, setting in study_cfg["settings"].items():
            key = f"studies.{study}.settings.{name}"
            if setting["type"] == "domain":
                _check_domain(config, setting.get("datasets", study_cfg["datasets"]), setting.get("domain"),
                              f"{key}.domain")
            for i, item in enumerate(setting.get("methods", [])):   # datasets: select_study_datasets
                if item not in study_cfg["methods"]:
                    raise ConfigError(f"config key {key}.methods[{i}]: {item!r} is not one of the study's "
                                      f"methods {study_cfg['methods']}")
            params = setting_params(setting)
            try:
                built = SETTINGS.get(setting["type"])(**params)
                for ds in setting.get("datasets", study_cfg["datasets"]):
                    try:
                        built.modalities(dataset_modalities(config["datasets"][ds]))
                    except ValueError as e:
                        raise ValueError(f"on dataset {ds!r}: {e}; limit the setting with datasets") from None
            except KeyError as e:
                raise ConfigError(f"config key {key}.type: {e.args[0]}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config key {key}: {e}") from None
        for ds in study_cfg["datasets"]:
            for name in study_backbones(config, study) or [None]:
                _check_backbone(config, study, ds, name)
        for run in study_grid(config, study):
            if needs_teachers(config, run["method"]) and not teacher_runs(config, study, run["dataset"], run["method"], run["seed"]):
                i = study_cfg["methods"].index(run["method"])
                raise ConfigError(f"config key studies.{study}.methods[{i}]: {run['method']!r} distils from unimodal "
                                  f"teachers, but the study has no one-modality 'subset' setting trained with 'joint' "
                                  f"on dataset {run['dataset']!r}")
            _check_modality_layers(config, study, run)
            _check_model_requirements(config, study, run)
            if config["datasets"][run["dataset"]]["loader"] in SEGMENTATION_LOADERS:
                try:
                    check_method_support("segmentation", method_plan(config, run["method"]))
                except ValueError as e:
                    i = study_cfg["methods"].index(run["method"])
                    raise ConfigError(f"config key studies.{study}.methods[{i}]: on dataset {run['dataset']!r} "
                                      f"(setting {run['setting']!r}): {e}; limit the setting with methods/datasets") from None
    _check_source_model(config)
    _check_cross_dataset(config)
    _check_adapters(config)


#: The plug-in family whose members a mechanisms sweep compares, per study.
MECHANISM_FAMILIES = {"balance": HOOKS, "peft": TRANSFORMS, "missing": TRANSFORMS, "shift": ADAPTERS}


def _check_mechanisms(config: dict[str, Any]) -> None:
    """Each sweep names a synth dataset (and, for shift, one of its domains) and methods of its study's family."""
    for study, sweep in config["mechanisms"]["studies"].items():
        key = f"mechanisms.studies.{study}"
        entry = config["datasets"].get(sweep["dataset"])
        if entry is None:
            continue  # the sweep is opt-in: a config without its dataset only fails if it asks for it
        if entry["loader"] != "synth":
            raise ConfigError(f"config key {key}.dataset: {sweep['dataset']!r} is not a synth dataset of datasets")
        if study == "shift" and sweep.get("domain") not in entry["synth"]["domains"]:
            raise ConfigError(f"config key {key}.domain: dataset {sweep['dataset']!r} has no target domain "
                              f"{sweep.get('domain')!r}; it has {sorted(entry['synth']['domains'])}")
        for i, method in enumerate(sweep["methods"]):
            if method not in MECHANISM_FAMILIES[study]:
                raise ConfigError(f"config key {key}.methods[{i}]: {method!r} is not a "
                                  f"{MECHANISM_FAMILIES[study].family}; known: {MECHANISM_FAMILIES[study].names()}")


def _check_source_model(config: dict[str, Any]) -> None:
    """``studies.shift.source_model`` must name a run the config trains on every shift dataset."""
    shift = config["studies"].get("shift")
    source = shift and shift.get("source_model")
    if not source:
        return
    key, study = "studies.shift.source_model", source["study"]
    if study not in config["studies"]:
        raise ConfigError(f"config key {key}.study: {study!r} is not a study of this config {sorted(config['studies'])}")
    runs = {(r["dataset"], r["method"], r["setting"]) for r in study_grid(config, study)}
    for ds in shift["datasets"]:
        if (ds, source["method"], source["setting"]) not in runs:
            raise ConfigError(f"config key {key}: study {study!r} has no run of method {source['method']!r}, setting "
                              f"{source['setting']!r} on dataset {ds!r} to adapt")


def _check_cross_dataset(config: dict[str, Any]) -> None:
    """A ``dataset`` setting names a dataset of the config, in a shift study, whose feature widths equal
    each source dataset's wherever both are known before any job runs (:func:`feature_widths`)."""
    for study, study_cfg in config["studies"].items():
        for name, setting in study_cfg["settings"].items():
            if setting["type"] != "dataset":
                continue
            key, target = f"studies.{study}.settings.{name}", setting.get("target")
            if STUDY_KINDS[study] != "adapt":
                raise ConfigError(f"config key {key}.type: a 'dataset' setting adapts a source model at test time: "
                                  f"shift studies only, not {study!r}")
            if target not in config["datasets"]:
                raise ConfigError(f"config key {key}.target: unknown dataset {target!r}; defined under datasets: "
                                  f"{sorted(config['datasets'])}")
            theirs = feature_widths(config, target)
            for ds in setting.get("datasets", study_cfg["datasets"]):
                ours = feature_widths(config, ds)
                if ours is not None and theirs is not None and ours != theirs:
                    raise ConfigError(f"config key {key}.target: feature widths differ between source dataset {ds!r} "
                                      f"{ours} and target dataset {target!r} {theirs}; a source model reads only "
                                      "features as wide as its own (give both corpora one feature set)")


def feature_widths(config: dict[str, Any], dataset: str) -> dict[str, int] | None:
    """Each modality's feature width, where known before any job: from the dataset's converted store, a
    synth generator's config, a published MMSA file's known widths or an MMSA pickle on disk (read once,
    until its store exists); None otherwise (other loaders' raw data, files not there yet)."""
    entry = config["datasets"][dataset]
    if entry["loader"] == "synth":
        return {m["name"]: int(m["dim"]) for m in entry["synth"]["modalities"]}
    manifest = Path(config["results"]) / "data" / dataset / "manifest.json"
    if manifest.is_file():
        from mmrepro.data.store import FeatureStore

        return {m.name: m.dim for m in FeatureStore(manifest).schema.modalities}
    if entry["loader"] == "mmsa":
        from mmrepro.data.mmsa import PUBLISHED_WIDTHS, mmsa_widths

        path = Path(dataset_path(config, dataset))
        if path.is_file() or any(path.as_posix().endswith("/" + rel) for rel in PUBLISHED_WIDTHS):
            return mmsa_widths(path, entry["params"].get("text", "bert"))
    return None


def target_dataset(config: dict[str, Any], study: str, dataset: str, setting: str) -> str:
    """The dataset a run reads: a ``dataset`` setting's target, else the run's own."""
    setting_cfg = config["studies"][study]["settings"][setting]
    return setting_cfg["target"] if setting_cfg["type"] == "dataset" else dataset


def setting_params(setting: dict[str, Any]) -> dict[str, Any]:
    """A setting's constructor arguments: its config entry without ``type``, ``methods`` and ``datasets``."""
    return {k: v for k, v in setting.items() if k not in ("type", "methods", "datasets")}


def _check_domain(config: dict[str, Any], datasets: list[str], domain: str | None, key: str) -> None:
    """A ``domain`` setting must name the source or a target domain every synth dataset defines (other
    datasets have only the source)."""
    for ds in datasets:
        entry = config["datasets"][ds]
        if entry["loader"] != "synth" and domain != "source":
            raise ConfigError(f"config key {key}: dataset {ds!r} is no synth dataset and has no target domain "
                              f"{domain!r} (only 'source'; another dataset is a 'dataset' setting)")
        if entry["loader"] == "synth" and domain != "source" and domain not in entry["synth"]["domains"]:
            raise ConfigError(f"config key {key}: dataset {ds!r} has no domain {domain!r}; it has "
                              f"{['source', *entry['synth']['domains']]}")


def dataset_path(config: dict[str, Any], dataset: str) -> str | None:
    """Where a dataset's raw data lives: its ``path`` under ``data_root`` unless absolute (None for synth)."""
    path = config["datasets"][dataset].get("path")
    return None if path is None else str(Path(config["data_root"]) / path)


def spec_file(config: dict[str, Any], text: str, write: bool = True) -> str:
    """Where a job reads its spec (JSON ``text``) from: ``<results>/specs/<hash>.json``, written once
    unless ``write`` is false (a dry run). The rules pass this path, not kilobytes of JSON, on the
    job's command line; the path carries the content's hash, so a changed spec is a changed rule
    parameter and Snakemake still reruns the job."""
    path = Path(config["results"]) / "specs" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if write and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path.as_posix()


def fetch_rules(config: dict[str, Any]) -> dict[str, str]:
    """Raw path -> the dataset whose name its fetch rule carries (``fetch_<dataset>``): the first that
    reads the path (datasets sharing a file share its rule)."""
    rules: dict[str, str] = {}
    for name in config["datasets"]:
        path = dataset_path(config, name)
        if path is not None:
            rules.setdefault(path, name)
    return rules


def dataset_spec(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """A dataset's config entry for the fetch and make-data jobs: path resolved, checksum registry named;
    a stand-in's path relative to ``data_root`` also names that folder (``stand_in_root``), where the
    fetch step writes it (:mod:`mmrepro.data.standin.entry`)."""
    entry = copy.deepcopy(config["datasets"][dataset])
    if entry["loader"] != "synth":
        entry.pop("synth", None)  # filled in by the schema's defaults, meaningless here
    if "path" in entry:
        if entry.get("stand_in") and not Path(entry["path"]).is_absolute():
            entry["stand_in_root"] = config["data_root"]
        entry["path"] = dataset_path(config, dataset)
        entry["checksums"] = str(Path(config["data_root"]) / "checksums.json")
    return entry


def _override(config: dict[str, Any], study: str, dataset: str | None) -> dict[str, Any]:
    return config["studies"][study].get("per_dataset", {}).get(dataset, {}) if dataset else {}


def model_config(config: dict[str, Any], study: str, dataset: str | None = None,
                 backbone: str | None = None) -> dict[str, Any]:
    """The model keys of one study (on one dataset, for one of its ``backbones``): top level < study <
    study's per-dataset override < the backbone's entry (the axis varies the architecture)."""
    return {**config["model"], **config["studies"][study].get("model", {}),
            **_override(config, study, dataset).get("model", {}),
            **((config["studies"][study].get("backbones") or {}).get(backbone) or {})}


def train_config(config: dict[str, Any], study: str, dataset: str | None = None) -> dict[str, Any]:
    """The training keys of one study (on one dataset), merged like :func:`model_config`."""
    return {**config["train"], **config["studies"][study].get("train", {}),
            **_override(config, study, dataset).get("train", {})}


def method_params(config: dict[str, Any], study: str, dataset: str, name: str) -> dict[str, Any]:
    """One plug-in's hyperparameters: top-level ``methods.<name>`` < the study's per-dataset override."""
    return {**config["methods"].get(name, {}), **_override(config, study, dataset).get("methods", {}).get(name, {})}


def paired_reference(config: dict[str, Any], study: str) -> str | None:
    """The method a study's other methods are paired with: ``studies.<study>.paired_with``, else the first
    of :data:`PAIRED_REFERENCES` the study runs (None: no paired column)."""
    study_cfg = config["studies"][study]
    if study_cfg["paired_with"] is not None:
        return study_cfg["paired_with"]
    return next((m for m in PAIRED_REFERENCES[study] if m in study_cfg["methods"]), None)


def paired_planned(config: dict[str, Any], study: str) -> bool:
    """Whether the study's paired-difference plot has an interval to draw: its reference row
    (:func:`paired_reference`) and another method run on one dataset, backbone and setting (the
    workflow writes no blank figure)."""
    reference = paired_reference(config, study)
    cells: dict[tuple, set[str]] = {}
    for run in study_grid(config, study):
        cells.setdefault((run["dataset"], run.get("backbone"), run["setting"]), set()).add(run["method"])
    return reference is not None and any(reference in methods and len(methods) > 1 for methods in cells.values())


def study_task(config: dict[str, Any], study: str, dataset: str) -> str:
    return config["studies"][study].get("task", config["datasets"][dataset]["task"])


def expand_variants(config: dict[str, Any], method: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """A method string with its ``method_variants`` names replaced by their plug-ins, and each such
    plug-in's parameter overrides (``cggm_direction`` -> ``cggm``, ``{"cggm": {"lam": 0.1, ...}}``)."""
    variants = config.get("method_variants", {})
    parts, overrides = [], {}
    for part in method.split("+"):
        if part in variants:
            base = variants[part]["method"]
            overrides[base] = dict(variants[part].get("params", {}))
            part = base
        parts.append(part)
    return "+".join(parts), overrides


def method_plan(config: dict[str, Any], method: str):
    """The plug-ins of a method string, variant names resolved (see :func:`expand_variants`)."""
    return resolve_method(expand_variants(config, method)[0])


def _axis(config: dict[str, Any], study: str, backbone: str | None) -> dict[str, str]:
    """``{"backbone": name}`` for a study with a backbone axis (None: its only backbone), else ``{}``."""
    names = list(study_backbones(config, study))
    if not names:
        return {}
    if backbone is None and len(names) == 1:
        backbone = names[0]
    if backbone not in names:
        raise ConfigError(f"config key studies.{study}.backbones: no backbone {backbone!r}; the study has {names}")
    return {"backbone": backbone}


def _spec(config: dict[str, Any], study: str, dataset: str, method: str, setting: str,
          setting_cfg: dict[str, Any], seed: int, task: str, backbone: str | None = None) -> RunSpec:
    base, overrides = expand_variants(config, method)
    plan = resolve_method(base)
    backbone = _axis(config, study, backbone).get("backbone")
    return RunSpec(
        study=study, dataset=dataset, backbone=backbone, method=method,
        setting=setting, seed=int(seed), task=task, plan=plan,
        method_params={name: {**method_params(config, study, dataset, name), **overrides.get(name, {})}
                       for name in plan.families().values()},
        data_setting=DataSetting(type=setting_cfg["type"], params=setting_params(setting_cfg)),
        model=ModelSpec(**model_config(config, study, dataset, backbone)),
        train=TrainConfig(**train_config(config, study, dataset)),
        utilisation_probes=config["studies"][study]["utilisation_probes"], feature_stats=False,
        tracking=TrackingSpec(uri=config["tracking"]["uri"], mode=config["tracking"]["mode"]),
        results=config["results"], stand_in=stand_in(config, dataset, setting_cfg.get("target")))


def stand_in(config: dict[str, Any], *datasets: str | None) -> str | None:
    """The stand-in scale of the data a run reads (the first of ``datasets`` marked ``stand_in``), or None:
    a run on any random stand-in is no result, whatever else it reads."""
    return next((config["datasets"][d]["stand_in"] for d in datasets
                 if d is not None and config["datasets"][d].get("stand_in")), None)


def run_spec(config: dict[str, Any], study: str, dataset: str, method: str, setting: str, seed: int,
             backbone: str | None = None) -> RunSpec:
    """Everything one training or adaptation job needs, resolved (the job's config artifact); ``backbone``
    names one of an adapting study's backbones (None: its only one)."""
    spec = _spec(config, study, dataset, method, setting, config["studies"][study]["settings"][setting], seed,
                 study_task(config, study, dataset), backbone)
    teachers = teacher_runs(config, study, dataset, method, seed)
    if teachers:
        spec = dataclasses.replace(spec, teachers={m: run["setting"] for m, run in teachers.items()})
    return dataclasses.replace(spec, checkpoint=start_checkpoint(config, study, dataset, seed, spec.backbone))


def start_checkpoint(config: dict[str, Any], study: str, dataset: str, seed: int,
                     backbone: str | None = None) -> CheckpointSpec | None:
    """What the model a study's run starts from must be (its ``model.pt`` is checked against it):
    fine-tuning, the study's backbone; adapting, the backbone of ``backbone`` on the study's axis or
    the ``source_model`` run; None for a study that trains from scratch."""
    kind, source = STUDY_KINDS[study], config["studies"][study].get("source_model")
    if kind == "train":
        return None
    if kind == "adapt" and source:
        start = run_spec(config, source["study"], dataset, source["method"], source["setting"], seed)
    else:
        start = backbone_spec(config, study, dataset, seed, backbone)
    return CheckpointSpec(model=start.model, task=start.task, transform=start.plan.transform)


def needs_teachers(config: dict[str, Any], method: str) -> bool:
    """Whether the method's hook distils from unimodal teachers (UMT)."""
    return bool(getattr(HOOKS.get(method_plan(config, method).hook), "needs_teachers", False))


def teacher_runs(config: dict[str, Any], study: str, dataset: str, method: str, seed: int) -> dict[str, dict[str, Any]]:
    """For a method that needs unimodal teachers: modality -> the study's run that trains that modality
    alone (a one-modality ``subset`` setting with ``joint``) on the same dataset and seed; else ``{}``."""
    if not needs_teachers(config, method):
        return {}
    study_cfg = config["studies"][study]
    runs = {}
    for name, setting in study_cfg["settings"].items():
        mods = setting.get("modalities", [])
        if (setting["type"] == "subset" and len(mods) == 1 and "joint" in setting.get("methods", study_cfg["methods"])
                and dataset in setting.get("datasets", study_cfg["datasets"])):
            runs.setdefault(mods[0], {"study": study, "dataset": dataset, "method": "joint", "setting": name,
                                      "seed": int(seed)})
    return runs


def backbone_spec(config: dict[str, Any], study: str, dataset: str, seed: int,
                  backbone: str | None = None) -> RunSpec:
    """The model a study starts from: plain joint training on complete source data.

    ``shift`` adapts a model of the dataset's own task; ``peft`` and ``missing`` fine-tune one
    pretrained on complete data of the dataset's pretraining task (MPLMM's stage 1: its prompts
    train on a frozen backbone; the baselines fine-tune all of it). Backbones are tracked in their
    own experiment; a shift backbone carries its name on the study's axis (``backbone``).
    """
    finetune = STUDY_KINDS[study] == "finetune"
    source = backbone_source(config, study, dataset)
    task = config["datasets"][source]["pretrain_task"] if finetune else study_task(config, study, dataset)
    spec = _spec(config, study, dataset, "joint", "complete", {"type": "complete"}, seed, task, backbone)
    return dataclasses.replace(spec, dataset=source, study="backbones", setting=f"for-{study}", feature_stats=True,
                               stand_in=stand_in(config, source))


def backbone_source(config: dict[str, Any], study: str, dataset: str) -> str:
    """The dataset a study's backbone for ``dataset`` is trained on: the study's ``pretrain_dataset``
    (MPLMM: CMU-MOSEI for every target dataset) or else ``dataset`` itself."""
    return config["studies"][study].get("pretrain_dataset") or dataset


def study_grid(config: dict[str, Any], study: str) -> list[dict[str, Any]]:
    """All (dataset, method, setting, seed) runs of a study, in config order; an adapting study's runs
    also name their ``backbone`` (:func:`study_backbones`), each adapted by every method.

    A setting that lists ``methods`` or ``datasets`` runs only those (e.g. unimodal baselines with
    plain joint training, on the datasets that have that modality).
    """
    study_cfg = config["studies"][study]
    axes = [{"backbone": b} for b in study_backbones(config, study)] or [{}]
    return [{"study": study, "dataset": d, **axis, "method": m, "setting": s, "seed": seed}
            for d in study_cfg["datasets"] for axis in axes for s, setting in study_cfg["settings"].items()
            for m in study_cfg["methods"]
            if m in setting.get("methods", study_cfg["methods"]) and d in setting.get("datasets", study_cfg["datasets"])
            for seed in config["seeds"]]


def run_folder(results: str, run: dict[str, Any]) -> str:
    """A run's folder under ``results``: ``<study>/<dataset>/[<backbone>/]<method>/<setting>/seed<k>`` (the
    backbone only on the shift study's axis)."""
    backbone = [run["backbone"]] if run.get("backbone") else []
    return Path(results, run["study"], run["dataset"], *backbone, run["method"], run["setting"],
                f"seed{run['seed']}").as_posix()


def backbone_runs(config: dict[str, Any], study: str) -> list[dict[str, Any]]:
    """The backbone jobs a study's runs start from, ``{study, dataset, seed[, backbone]}`` each: none for
    a study that trains from scratch or adapts another study's runs (``source_model``)."""
    kind = STUDY_KINDS[study]
    if kind == "train" or (kind == "adapt" and config["studies"][study].get("source_model")):
        return []
    keys = ("study", "dataset", "seed", "backbone")
    starts = {tuple((k, run[k]) for k in keys if k in run) for run in study_grid(config, study)}
    return [dict(start) for start in sorted(starts)]


def mechanism_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (study, dose, seed) point of the mechanisms sweeps, doses written as the float's ``str``."""
    mech = config["mechanisms"]
    return [{"study": study, "dose": str(float(dose)), "seed": seed}
            for study, sweep in mech["studies"].items() for dose in sweep["doses"] for seed in mech["seeds"]]


def mechanism_spec(config: dict[str, Any], study: str, dose: float, seed: int) -> MechanismSpec:
    """What one mechanisms point needs: its dataset entry at the sweep's sample sizes, budget and methods."""
    mech, sweep = config["mechanisms"], config["mechanisms"]["studies"][study]
    if sweep["dataset"] not in config["datasets"]:
        raise ConfigError(f"config key mechanisms.studies.{study}.dataset: {sweep['dataset']!r} is not a dataset "
                          f"of this config; known: {sorted(config['datasets'])}")
    entry = dataset_spec(config, sweep["dataset"])
    entry["synth"]["n"] = dict(mech["n"])
    return MechanismSpec(study=study, dataset=entry, dose=float(dose), seed=int(seed), budget=dict(mech["budget"]),
                         methods=list(sweep["methods"]),
                         params={m: config["methods"].get(m, {}) for m in sweep["methods"]}, domain=sweep.get("domain"))


# --- hyperparameter searches --------------------------------------------------------------------

#: ``studies.<study>.tune`` value that searches every method of the study at one budget.
EQUAL_BUDGET = "equal"

def tuned_methods(config: dict[str, Any], study: str) -> list[str]:
    """The study's methods that are searched: ``tune: true`` or ``equal`` means all of them, a list names some."""
    tune = config["studies"][study]["tune"]
    return list(config["studies"][study]["methods"]) if tune is True or tune == EQUAL_BUDGET else list(tune or [])


def _current(spec: RunSpec, key: str) -> tuple[Any, Any]:
    """The value a run uses today for a space key (the config's, else the plug-in's own default) and
    the key's declared type."""
    section, field, plugin = spec.space_field(key)
    if plugin is None:
        owner = getattr(spec, section)
        return getattr(owner, field), typing.get_type_hints(type(owner))[field]
    family = next(f for f, name in spec.plan.families().items() if name == plugin)
    param = declared(METHOD_FAMILIES[family].get(plugin)).get(field)
    if param is None or (field not in spec.method_params[plugin] and param.default is inspect.Parameter.empty):
        raise KeyError(f"{plugin} has no parameter {field!r} with a default")
    return spec.method_params[plugin].get(field, param.default), param.hint


def _check_point(dist: dict[str, Any], value: Any, hint: Any, key: str) -> None:
    """A search range: its bounds or choices are values the key's declared type takes (a float range
    for an int is refused), and the default point lies in it."""
    bounds = {f"choices[{i}]": c for i, c in enumerate(dist["choices"])} if "choices" in dist else \
        {"low": dist["low"], "high": dist["high"]}
    for name, bound in bounds.items():
        wrong = problem(bound, hint)
        if wrong is not None:
            raise ConfigError(f"config key {key}.{name}: {wrong}")
    if "choices" not in dist and dist.get("type", "float") == "float" and numeric_kind(hint) == "int":
        raise ConfigError(f"config key {key}.type: the parameter is an int, a float range would try fractions; "
                          "set type: int")
    if "choices" in dist:
        if value not in dist["choices"]:
            raise ConfigError(f"config key {key}: the default point {value!r} is not one of {dist['choices']}")
        return
    if not dist["low"] < dist["high"]:
        raise ConfigError(f"config key {key}: low {dist['low']} must be below high {dist['high']}")
    if dist.get("log") and dist["low"] <= 0:
        raise ConfigError(f"config key {key}: a log range needs low > 0")
    if not dist["low"] <= value <= dist["high"]:
        raise ConfigError(f"config key {key}: the default point {value!r} (the config's value) is outside "
                          f"[{dist['low']}, {dist['high']}]")


def search_run(config: dict[str, Any], study: str, dataset: str, method: str) -> dict[str, Any]:
    """The run a search's trials stand for: the study's first run of ``method`` on ``dataset`` (its
    setting, seed and backbone say which store the trials read and which model they start from)."""
    return next(r for r in study_grid(config, study) if r["dataset"] == dataset and r["method"] == method)


def search_spec(config: dict[str, Any], study: str, dataset: str, method: str) -> dict[str, Any]:
    """Everything one search (:mod:`mmrepro.tune`) needs, resolved: the trials' run spec (as JSON),
    space, default point, budget, storage."""
    run = search_run(config, study, dataset, method)
    space = config["tune"]["space"].get(method)
    if not space:
        raise ConfigError(f"config key tune.space.{method}: studies.{study}.tune searches {method!r}, "
                          "but it has no search space")
    spec = run_spec(config, study, dataset, method, run["setting"], run["seed"], run.get("backbone"))
    default = {}
    for key, dist in space.items():
        try:
            default[key], hint = _current(spec, key)
        except KeyError as e:
            raise ConfigError(f"config key tune.space.{method}.{key}: {e.args[0]}") from None
        _check_point(dist, default[key], hint, f"tune.space.{method}.{key}")
    tune = config["tune"]
    body = {"study": study, "dataset": dataset, "method": method, "kind": STUDY_KINDS[study], "spec": spec.to_dict(),
            "space": space, "default": default, "trials": tune["trials"], "seed": tune["seed"],
            "sampler": tune["sampler"], "pruner": tune["pruner"]}
    folder = f"{config['results']}/tune/{study}/{dataset}/{method}"
    return {**body, "name": f"{study}.{dataset}.{method}.{config_hash(body)}", "workers": tune["workers"],
            "timeout": tune["timeout"], "storage": tune["storage"] or f"{folder}/journal.log"}


def _check_tune(config: dict[str, Any]) -> None:
    """Every searched method is one of its study's and has a valid space; ``tune: equal`` also needs
    spaces of one size and no worker timeout (:func:`_check_equal_budget`)."""
    for study, study_cfg in config["studies"].items():
        for i, method in enumerate(tuned_methods(config, study)):
            if method not in study_cfg["methods"]:
                raise ConfigError(f"config key studies.{study}.tune[{i}]: {method!r} is not one of the study's "
                                  f"methods {study_cfg['methods']}")
            for dataset in study_cfg["datasets"]:
                search_spec(config, study, dataset, method)
        if study_cfg["tune"] == EQUAL_BUDGET:
            _check_equal_budget(config, study)


def _check_equal_budget(config: dict[str, Any], study: str) -> None:
    """Equal budget: every method searched (:func:`tuned_methods`) with ``tune.trials`` finished trials
    each, over spaces with the same number of parameters, so that no method wins by a bigger search; a
    worker timeout would end some searches before their trials, so it is refused."""
    if config["tune"]["timeout"] is not None:
        raise ConfigError(f"config key tune.timeout: studies.{study}.tune is {EQUAL_BUDGET!r}, which gives every "
                          "method the same number of trials; a timeout would cut some searches short (set null)")
    sizes = {method: len(config["tune"]["space"][method]) for method in tuned_methods(config, study)}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"config key studies.{study}.tune: {EQUAL_BUDGET!r} searches every method over a space "
                          f"of the same size, but tune.space gives these sizes (parameters per method): {sizes}")
