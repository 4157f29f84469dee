"""Everything that turns a user's model description into a ModelGraph.

`load_model` is the one entry point the CLI uses: a catalog name (models/), a Hugging Face config.json,
or a project model file (YAML/JSON). A torch.nn.Module goes through `importers.torch_module`.
"""
from __future__ import annotations

from pathlib import Path

from planner.catalog import models_dir, parse_as, read_data_file
from planner.errors import BadInput, did_you_mean
from planner.model import ModelGraph

_MODEL_SUFFIXES = (".yaml", ".yml", ".json")


def model_catalog() -> dict[str, Path]:
    """Preset name -> file: project model files in models/, HF config.json files in models/hf/."""
    root = models_dir()
    found: dict[str, Path] = {}
    for folder in (root, root / "hf"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in _MODEL_SUFFIXES and not path.name.startswith("_"):
                found[path.stem] = path
    return found


def model_names() -> list[str]:
    return sorted(model_catalog())


def is_hf_config(data: dict) -> bool:
    return "model_type" in data or "architectures" in data


def model_from_data(data, where: str, name: str | None = None) -> ModelGraph:
    from planner.builders import DiffusionConfig, TransformerConfig, build_diffusion, build_transformer
    from planner.importers.hf import from_hf_config

    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    if is_hf_config(data):
        return from_hf_config(data, where, name=name)
    data = dict(data)
    family = data.pop("family", "diffusion" if "backbone" in data else "transformer")
    if family == "diffusion":
        return build_diffusion(parse_as(DiffusionConfig, data, where))
    if family == "transformer":
        return build_transformer(parse_as(TransformerConfig, data, where))
    raise BadInput(f"{where}: field 'family' must be 'transformer' or 'diffusion', got {family!r}")


def load_model(name_or_path: str) -> ModelGraph:
    catalog = model_catalog()
    if name_or_path in catalog:
        path = catalog[name_or_path]
        return model_from_data(read_data_file(path), str(path), name=name_or_path)
    path = Path(name_or_path)
    if path.suffix in _MODEL_SUFFIXES or path.exists():
        if path.is_dir() and (path / "config.json").exists():
            path = path / "config.json"
        return model_from_data(read_data_file(path), str(path),
                               name=path.parent.name if path.name == "config.json" else path.stem)
    raise BadInput(f"unknown model '{name_or_path}'{did_you_mean(name_or_path, catalog)}; "
                   "give a preset name (see `profiles list`), a config.json or a model YAML/JSON file")
