"""Everything that turns a user's model description into a ModelGraph.

`load_model` is the one entry point the CLI uses: a catalog name (models/), a Hugging Face config.json,
or a project model file (YAML/JSON). A torch.nn.Module goes through `importers.torch_module`.
"""
from __future__ import annotations

from pathlib import Path

from planner.catalog import models_dir, parse_as, read_data_file
from planner.core.errors import BadInput, did_you_mean
from planner.core.model import ModelGraph
from planner.files import path_exists

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
    from planner.core.builders import DiffusionConfig, TransformerConfig, build_diffusion, build_transformer
    from planner.importers.hf import from_hf_config

    if data is None:
        raise BadInput(f"{where}: the file is empty; expected a model's fields (a project model file) "
                       "or a Hugging Face config.json")
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping of fields (a project model file or a config.json), "
                       f"got {'a list' if isinstance(data, list) else type(data).__name__}")
    if is_hf_config(data):
        return from_hf_config(data, where, name=name)
    data = dict(data)
    family = data.pop("family", "diffusion" if "backbone" in data else "transformer")
    if family == "diffusion":
        cfg = parse_as(DiffusionConfig, data, where)
        check_diffusion_sizes(cfg, where)
        return build_diffusion(cfg)
    if family == "transformer":
        cfg = parse_as(TransformerConfig, data, where)
        check_transformer_sizes(cfg, where)
        return build_transformer(cfg)
    raise BadInput(f"{where}: field 'family' must be 'transformer' or 'diffusion', got {family!r}")


# A frozen VAE's published figures: parameters, GFLOPs per sample, latent elements per sample.
_VAE_LIMITS = {"params": 10**13, "gflops_per_sample": 1e9, "latent_elems_per_sample": 2**32}


def _in_range(value, hi, field: str, where: str, lo=1) -> None:
    if value is not None and not lo <= value <= hi:
        raise BadInput(f"{where}: field '{field}' is {value:,}; it must be from {lo:,} to {hi:,}")


def check_transformer_sizes(cfg, where: str, prefix: str = "") -> None:
    """Every size of a project file's transformer within model.SIZE_LIMITS, and its MoE layers inside the
    model: one line naming the file, the field and the range."""
    from planner.core.model import SIZE_LIMITS as L

    for field in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "max_seq"):
        _in_range(getattr(cfg, field), L[field], prefix + field, where)
    if cfg.moe is not None:
        m = cfg.moe
        for field, limit in (("experts", "experts"), ("topk", "topk"), ("ffn_hidden", "ffn_hidden")):
            _in_range(getattr(m, field), L[limit], f"{prefix}moe.{field}", where)
        _in_range(m.shared_experts, L["experts"], f"{prefix}moe.shared_experts", where, lo=0)
        _in_range(m.shared_ffn_hidden, L["ffn_hidden"], f"{prefix}moe.shared_ffn_hidden", where, lo=0)
        _in_range(m.route_groups, m.experts, f"{prefix}moe.route_groups", where, lo=0)
        # MoE blocks are those i >= dense_layers_first with (i + 1) % every == 0: at least one must exist.
        if m.dense_layers_first >= cfg.layers:
            raise BadInput(f"{where}: field '{prefix}moe.dense_layers_first' is {m.dense_layers_first}: every "
                           f"MoE block would lie past the last of the {cfg.layers} layers; give 0..{cfg.layers - 1}")
        first_moe = m.dense_layers_first + (-(m.dense_layers_first + 1)) % m.every
        if first_moe >= cfg.layers:
            raise BadInput(f"{where}: field '{prefix}moe.every' is {m.every}: with dense_layers_first "
                           f"{m.dense_layers_first} the first MoE block would be block {first_moe}, past the "
                           f"last of the {cfg.layers} layers")
    if cfg.mla is not None:
        for field in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            limit = L["rank"] if field.endswith("rank") else L["head_dim"]
            _in_range(getattr(cfg.mla, field), limit, f"{prefix}mla.{field}", where, lo=0)


def check_diffusion_sizes(cfg, where: str) -> None:
    from planner.core.model import SIZE_LIMITS as L

    check_transformer_sizes(cfg.backbone, where, "backbone.")
    _in_range(cfg.latent_tokens, L["max_seq"], "latent_tokens", where)
    _in_range(cfg.conditioning_hidden, L["hidden"], "conditioning_hidden", where)
    for i, enc in enumerate(cfg.text_encoders):
        for field in ("layers", "hidden", "heads", "ffn_hidden", "vocab"):
            _in_range(getattr(enc, field), L[field], f"text_encoders.{i}.{field}", where)
        _in_range(enc.tokens, L["max_seq"], f"text_encoders.{i}.tokens", where)
        if enc.hidden % enc.heads:
            raise BadInput(f"{where}: field 'text_encoders.{i}.hidden' ({enc.hidden}) is not a multiple of "
                           f"its heads ({enc.heads})")
    for field, hi in _VAE_LIMITS.items():
        _in_range(getattr(cfg.vae, field), hi, f"vae.{field}", where, lo=0)


def load_model(name_or_path: str) -> ModelGraph:
    catalog = model_catalog()
    if name_or_path in catalog:
        path = catalog[name_or_path]
        return model_from_data(read_data_file(path), str(path), name=name_or_path)
    path = Path(name_or_path)
    if path.suffix in _MODEL_SUFFIXES or path_exists(path):
        if path_exists(path / "config.json"):
            path = path / "config.json"
        return model_from_data(read_data_file(path, "model file"), str(path),
                               name=path.parent.name if path.name == "config.json" else path.stem)
    raise BadInput(f"unknown model '{name_or_path}'{did_you_mean(name_or_path, catalog)}; "
                   "give a preset name (see `profiles list`), a config.json or a model YAML/JSON file")

