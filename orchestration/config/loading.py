"""Config in and out: Hydra's composition, conf YAML files and saved run configs, all typed.

The one way YAML becomes a schema object is :func:`load_yaml`: a Hydra group file (its
``defaults`` list dropped, a ``# @package`` wrapper key unwrapped) or a plain dump, merged into
the dataclass so an unknown key or a wrong type fails naming the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestration.common.paths import CONF_DIR
from orchestration.config.schema import DataConfig, ModelConfig, RunConfig
from orchestration.config.validate import ConfigError, MissingConfigFile

T = TypeVar("T")


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can list ``run_schema`` in its defaults."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def to_run_config(cfg: DictConfig | dict | RunConfig) -> RunConfig:
    """Resolve interpolations and convert Hydra's DictConfig (or a dict) into the dataclass."""
    if isinstance(cfg, RunConfig):
        return cfg
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    # Merge a plain copy: a key forced in with `+key=...` must still fail against the schema.
    typed = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(container))
    return OmegaConf.to_object(typed)  # type: ignore[return-value]


def to_data_config(data: DataConfig | dict) -> DataConfig:
    """A data mix from a plain dict (e.g. a recorded ``data_history`` entry), typed."""
    if isinstance(data, DataConfig):
        return data
    typed = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(data))
    return OmegaConf.to_object(typed)  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A schema object as plain, resolved Python containers (for YAML/JSON and W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def load_yaml(path: str | Path, schema: type[T], wrapper: str | None = None) -> T:
    """``path`` as a typed ``schema`` object; ``wrapper`` is a top-level key to unwrap (a group
    file that puts everything under ``model:``). Errors name the file."""
    path = Path(path)
    try:
        raw = OmegaConf.load(path)
        raw.pop("defaults", None)
        if wrapper and set(raw.keys()) == {wrapper}:
            raw = raw[wrapper]
        container = OmegaConf.to_container(raw, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(container))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from err


def group_file(group: str, name: str | Path, conf_dir: Path = CONF_DIR) -> Path:
    """``conf/<group>/<name>.yaml``, or ``name`` itself when it is a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = conf_dir / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        raise MissingConfigFile(f"{group} '{name}': no {path}; known: {known}")
    return path


def load_data_mix(name: str | Path, conf_dir: Path = CONF_DIR) -> DataConfig:
    """A data mix by name (``conf/data/<name>.yaml``) or path, as a typed DataConfig."""
    return load_yaml(group_file("data", name, conf_dir), DataConfig, wrapper="data")


def load_model_config(name: str | Path, conf_dir: Path = CONF_DIR) -> ModelConfig:
    """A model by name (``conf/model/<name>.yaml``) or path, as a typed ModelConfig."""
    return load_yaml(group_file("model", name, conf_dir), ModelConfig, wrapper="model")


def load_run_config(path: str | Path, **overrides: Any) -> RunConfig:
    """A saved run config (a run record's ``config.yaml``) with top-level ``overrides``."""
    raw = OmegaConf.load(path)
    for key, value in overrides.items():
        raw[key] = value
    try:
        return to_run_config(raw)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from err
