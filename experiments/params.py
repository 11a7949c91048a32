"""Grid parameters: the paper's short names, value lists, and their translation into config overrides.

A grid parameter is either a short name for one of the paper's knobs or any dotted config path:

    lambda1      model.aux.lambda1                 Eq. 6: weight of the customized positive queries' losses
    lambda2      model.aux.lambda2                 Eq. 6: weight of the auxiliary heads' losses, counted once
                                                   per decoder layer (effective num_decoder_layers x lambda2)
    num_convs    model.aux.num_convs               stacked convs in the one-stage auxiliary heads (0..5)
    aux_heads    model.aux.heads                   K and which heads: `atss+faster_rcnn`, `none` for K=0
    method       model.method (+ model.aux.heads)  how positives are added in training: deformable_detr (none),
                                                   h_detr, group_detr (heads []) or co_detr (the base's heads,
                                                   else [atss]: K = 1); an aux_heads of the same point wins
    num_queries  model.num_queries                 one-to-one queries
    epochs       optim.epochs                      with the lr drop at the preset's place in the schedule
                                                   (12 epochs dropping after 11 -> 36 dropping after 33)
    lr           optim.lr

Values are given as text (`0.25`, `atss+faster_rcnn`, `[224,256]`) and parsed by the config's own typed
parser, so a bad value fails before any run starts. A dotted key is set alone: `model.method=h_detr` keeps the
base's heads (and fails validation on a base that has some), where `method=h_detr` also clears them.
"""
from __future__ import annotations

import difflib

from codetr.config import Config, method_names, apply_overrides, epochs_overrides, scaled_lr_drops, valid_keys
from codetr.errors import ConfigError

SHORT_NAMES: dict[str, str] = {
    "lambda1": "model.aux.lambda1",
    "lambda2": "model.aux.lambda2",
    "num_convs": "model.aux.num_convs",
    "aux_heads": "model.aux.heads",
    "method": "model.method",
    "num_queries": "model.num_queries",
    "epochs": "optim.epochs",
    "lr": "optim.lr",
}

NO_HEADS = ("none", "0", "[]", "")

# The `method` parameter's values ("auto" is left to the dotted key: on a grid it would mean "whatever the
# heads say") and the heads co_detr gets on a base without any: K = 1 (ATSS), the paper's comparison.
DEFAULT_CO_DETR_HEADS = ("atss",)


def config_key(name: str, cfg: Config) -> str:
    """The dotted config key of a parameter name; an unknown name lists what is valid."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    keys = valid_keys(cfg)
    if name in keys:
        return name
    close = difflib.get_close_matches(name, [*SHORT_NAMES, *keys], n=3, cutoff=0.6)
    raise ConfigError(
        f"unknown grid parameter {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
        + f"; valid: the short names {', '.join(SHORT_NAMES)} or any config key (see `codetr config`), "
        "e.g. model.aux.lambda1"
    )


def override_text(name: str, value: str, cfg: Config) -> str:
    """The `key=value` override for one parameter value, e.g. ('aux_heads', 'atss+fcos') ->
    'model.aux.heads=[atss,fcos]'."""
    key = config_key(name, cfg)
    value = str(value).strip()
    if key == "model.aux.heads" and not value.startswith("["):
        heads = [] if value.lower() in NO_HEADS else value.split("+")
        value = "[" + ",".join(heads) + "]"
    return f"{key}={value}"


def method_overrides(value: str, point: dict[str, str], cfg: Config) -> list[str]:
    """The overrides of `method=value`: model.method plus the auxiliary heads the method implies ([] for the
    one-to-one baseline, H-DETR and Group-DETR; for co_detr the base's heads, else [atss]), unless the same
    point sets the heads itself (aux_heads or model.aux.heads), whose value then wins.

    e.g. ('h_detr', {'method': 'h_detr'}, co_tiny) -> ['model.method=h_detr', 'model.aux.heads=[]']."""
    method = str(value).strip()
    grid_methods = [m for m in method_names() if m != "auto"]
    if method not in grid_methods:
        raise ConfigError(f"method={method!r}: expected one of {', '.join(grid_methods)}")
    overrides = [f"model.method={method}"]
    if any(config_key(name, cfg) == "model.aux.heads" for name in point):
        return overrides
    heads = (list(cfg.model.aux.heads) or list(DEFAULT_CO_DETR_HEADS)) if method == "co_detr" else []
    return overrides + ["model.aux.heads=[" + ",".join(heads) + "]"]


def point_overrides(point: dict[str, str], cfg: Config) -> list[str]:
    """The overrides of a grid point (parameter name -> value text), in the point's order. An epochs
    value also moves the lr drop (epochs_overrides), unless the point sets optim.lr_drop_epochs itself
    or the base pinned it (its drops are not the ones its own epochs would get). `method` may add the
    heads it implies (method_overrides)."""
    overrides: list[str] = []
    for name, value in point.items():
        if name == "method":
            overrides += method_overrides(value, point, cfg)
        else:
            overrides.append(override_text(name, value, cfg))
    keys = [item.split("=", 1)[0] for item in overrides]
    pinned = tuple(cfg.optim.lr_drop_epochs) != scaled_lr_drops(cfg.preset, cfg.optim.epochs)
    if "optim.epochs" in keys and "optim.lr_drop_epochs" not in keys and not pinned:
        epochs_text = overrides[keys.index("optim.epochs")].split("=", 1)[1]
        try:
            epochs = int(epochs_text)
        except ValueError:
            raise ConfigError(f"optim.epochs={epochs_text!r}: expected an integer") from None
        overrides[keys.index("optim.epochs"):keys.index("optim.epochs") + 1] = epochs_overrides(cfg.preset, epochs)
    return overrides


def check_point(point: dict[str, str], base: Config) -> Config:
    """Apply a point to the base config, raising ConfigError (naming the parameter) if it is invalid."""
    try:
        return apply_overrides(base, point_overrides(point, base))
    except ConfigError as error:
        where = ", ".join(f"{name}={value}" for name, value in point.items())
        raise ConfigError(f"grid point {where}: {error}") from None


def split_values(text: str) -> list[str]:
    """Split `--values` on commas outside brackets: '0.25,0.5' -> ['0.25', '0.5'];
    '[224,256],[320]' -> ['[224,256]', '[320]']."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if depth != 0 or any(v == "" for v in values):
        raise ConfigError(f"--values {text!r}: expected a comma-separated list such as 0.25,0.5,1,2")
    return values


def format_value(value: object) -> str:
    """Canonical text of a value read from YAML or the command line (1 and 1.0 stay distinct: the
    config parser accepts both for float fields)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value).strip()
