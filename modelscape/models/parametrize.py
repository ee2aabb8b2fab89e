"""Parametrizations: sp, ntp, mup, mfp, ntp-lr and mup-lr, for any torch optimizer.

A parametrization gives every weight layer three numbers: a forward *multiplier* ``g`` (the
layer computes ``g * (W x + b)``), an *init std* for ``W`` and ``b``, and a *learning-rate scale*
that multiplies the base LR in the layer's optimizer param group. Layers are found by anatomy,
as mupify does: the ``nn.Linear``/``nn.Conv2d`` modules in registration order; the first is the
readin, the last the readout, the rest hidden; the *width* ``n`` is the largest output fan of
all but the readout. There is no base width: the formulas are absolute in ``n`` (mupify's
convention), so ``mup`` at any width is not SP and LR values do not carry over from SP.

With ``a = sqrt(n)`` for mup, mfp and mup-lr (``a = 1`` for ntp, ntp-lr), fan-in ``k`` and
``q = a**2 / k`` (``1 / k`` for the readout), the tables are mupify's:

    param            multiplier g    init std     SGD lr scale
    mup              sqrt(q)         1/a          1
    mfp, ntp         sqrt(q)/a       1            a**2
    mup-lr, ntp-lr   1               sqrt(q)/a    q

In every row the *effective* weights ``g W`` start with std ``sqrt(q)/a`` and take SGD steps of
size ``q``: mup, mfp and mup-lr are one parametrization written three ways, and so are ntp and
ntp-lr. Adam's update is ``lr * sign(grad)`` to first order, so its LR does not pick up the
gradient's size; the Adam LR scale is ``q * D / g`` where ``D`` is the gradient's scale at the
layer (1 at the readout, ``1/(a sqrt(n))`` below it). For mup this is Tensor Programs V's Adam
column: effective LR 1/fan_in for hidden and readout (and 1/d_in, a width-independent constant,
for the readin).

Weight decay is decoupled from those scales: each group's ``weight_decay`` is divided by its LR
scale, so with SGD or AdamW every layer's effective weights shrink by ``1 - LR * WEIGHT_DECAY``
per step under every parametrization, as under SP. ``nn.ReLU`` modules become ``ScaledReLU``
(``sqrt(2) * relu``), as mupify does, so that preactivations keep unit variance through ReLU
layers.

Only the model's layer types and the optimizer's param groups change: multipliers are buffers of
``ParametrizedLinear``/``ParametrizedConv2d`` (subclasses of the torch layers, with the same
parameter names), so ``torch.func`` stacking and ``state_dict`` keys work as before.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from modelscape.errors import ParametrizationError
from modelscape.sweep.hparams import PARAMETRIZATIONS

Rule = Literal["sgd", "adam"]
Role = Literal["readin", "hidden", "readout"]

RELU_GAIN = math.sqrt(2.0)

# The learning-rate rule of each torch optimizer, by its update type: "sgd" when the step is
# proportional to the gradient, "adam" when the step is normalized by the gradient's own size
# (invariant to its scale). Subclasses take their base class's rule. Any other optimizer gets the
# SGD rule (mupify's choice) with a warning naming it. The README's table lists this one.
OPTIMIZER_RULES: dict[type[torch.optim.Optimizer], Rule] = {
    torch.optim.SGD: "sgd",
    torch.optim.ASGD: "sgd",
    torch.optim.Adam: "adam",
    torch.optim.AdamW: "adam",
    torch.optim.NAdam: "adam",
    torch.optim.RAdam: "adam",
    torch.optim.Adamax: "adam",
    torch.optim.RMSprop: "adam",
    torch.optim.Adagrad: "adam",
    torch.optim.Adadelta: "adam",
    torch.optim.Rprop: "adam",
}

# Models rescaled by `mupify`/`apply` (value: the parametrization), and models whose readout
# `rescale` changed. Weak, so that tracking never keeps a model alive.
_PARAMETRIZED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_RESCALED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class ParametrizedLinear(nn.Linear):
    """``nn.Linear`` whose output is multiplied by the buffer ``multiplier``."""

    multiplier: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **factory):
        super().__init__(in_features, out_features, bias=bias, **factory)
        # non-persistent: state_dict keys stay those of nn.Linear
        self.register_buffer("multiplier", torch.ones((), **factory), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.multiplier

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={float(self.multiplier):.4g}"


class ParametrizedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose output is multiplied by the buffer ``multiplier``."""

    multiplier: torch.Tensor

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        factory = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        self.register_buffer("multiplier", torch.ones((), **factory), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.multiplier

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={float(self.multiplier):.4g}"


class ScaledReLU(nn.ReLU):
    """``gain * relu(x)``; ``sqrt(2)`` keeps a unit-variance input's second moment at 1."""

    def __init__(self, gain: float = RELU_GAIN, inplace: bool = False):
        super().__init__(inplace=inplace)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain

    def extra_repr(self) -> str:
        return f"gain={self.gain:.4g}"


WEIGHT_LAYERS = (nn.Linear, nn.Conv2d, ParametrizedLinear, ParametrizedConv2d)


@dataclass(frozen=True)
class LayerScale:
    """One weight layer's role and the numbers a parametrization gives it."""

    name: str  # module path, as in model.named_modules()
    role: Role
    fan_in: int
    multiplier: float
    init_std: float
    lr_scale: float  # multiplies the base LR (the group's lr) for this layer


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's ``nn.Linear``/``nn.Conv2d`` layers (exact types), in registration order."""
    return [(name, m) for name, m in model.named_modules() if type(m) in WEIGHT_LAYERS]


def anatomy(model: nn.Module) -> tuple[list[tuple[str, nn.Module, Role]], int]:
    """The weight layers with their roles, and the model's width.

    Raises ``ParametrizationError`` when a module with its own parameters is not a plain
    ``nn.Linear``/``nn.Conv2d`` (attention, normalization, embeddings): mupify's rules say
    nothing about how to scale it.
    """
    for name, m in model.named_modules():
        if type(m) in WEIGHT_LAYERS or not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.MultiheadAttention):
            raise ParametrizationError(
                f"module {name!r} is attention ({type(m).__name__}). The ntp/mup/mfp rules here "
                "(mupify's) cover nn.Linear and nn.Conv2d layers only; muP attention also needs "
                "1/d_head logit scaling and zero-initialized queries, which these rules do not "
                "define, so rescaling the surrounding layers would be silently wrong. Use "
                "PARAMETRIZATION='sp' for this model."
            )
        raise ParametrizationError(
            f"module {name!r} ({type(m).__name__}) has its own parameters, but the ntp/mup/mfp "
            "rules (mupify's) only know how to scale nn.Linear and nn.Conv2d layers. Build the "
            "model from those (no normalization or embedding layers), or use "
            "PARAMETRIZATION='sp'."
        )
    layers = weight_layers(model)
    if len(layers) < 2:
        raise ParametrizationError(
            f"{type(model).__name__} has {len(layers)} nn.Linear/nn.Conv2d layer(s); a "
            "parametrization needs a readin and a separate readout layer."
        )
    width = max(int(m.weight.shape[0]) for _, m in layers[:-1])
    roles: list[Role] = ["readin"] + ["hidden"] * (len(layers) - 2) + ["readout"]
    return [(name, m, role) for (name, m), role in zip(layers, roles)], width


def update_rule(optimizer_cls: type[torch.optim.Optimizer]) -> Rule:
    """Which learning-rate table an optimizer class takes: ``"sgd"`` or ``"adam"``.

    From ``OPTIMIZER_RULES`` (subclasses included); an optimizer it does not list gets the SGD
    rule, with a warning that names the rule.
    """
    for cls in optimizer_cls.__mro__:
        if cls in OPTIMIZER_RULES:
            return OPTIMIZER_RULES[cls]
    warnings.warn(
        f"{optimizer_cls.__name__} is not in modelscape's optimizer table; using the SGD rule "
        "(gradient-proportional update: per-layer LR scale q = a**2/fan_in). If its step is "
        "normalized by the gradient's size, like Adam's, subclass torch.optim.Adam or add it "
        "to modelscape.models.parametrize.OPTIMIZER_RULES as 'adam'.",
        UserWarning,
        stacklevel=2,
    )
    return "sgd"


def scales(
    role: Role, param: str, fan_in: int, width: int, rule: Rule
) -> tuple[float, float, float]:
    """``(multiplier, init_std, lr_scale)`` of one layer; see the module docstring's table."""
    a = math.sqrt(width) if param in ("mup", "mfp", "mup-lr") else 1.0
    q = 1.0 / fan_in if role == "readout" else a * a / fan_in
    if param in ("mup-lr", "ntp-lr"):
        g = 1.0
    elif param == "mup":
        g = math.sqrt(q)
    elif param in ("mfp", "ntp"):
        g = math.sqrt(q) / a
    else:
        raise ParametrizationError(
            f"parametrization {param!r} is not one of {', '.join(PARAMETRIZATIONS)}."
        )
    init_std = math.sqrt(q) / (a * g)
    if rule == "sgd":
        lr_scale = q / (g * g)
    else:
        # Adam moves each entry by ~lr: scale SGD's per-layer step q by the gradient's size
        # at the layer, 1 at the readout and the effective readout weight std below it.
        grad_scale = 1.0 if role == "readout" else 1.0 / (a * math.sqrt(width))
        lr_scale = q * grad_scale / g
    return g, init_std, lr_scale


def layer_scales(
    model: nn.Module, param: str, optimizer: Rule | type[torch.optim.Optimizer] = "sgd"
) -> list[LayerScale]:
    """The table ``param`` gives each weight layer of ``model`` (nothing is changed).

    ``optimizer`` is ``"sgd"``, ``"adam"`` or an optimizer class. Use it to check what a
    parametrization will do before a sweep: ``pd.DataFrame(layer_scales(model, "mup"))``.
    """
    rule = optimizer if isinstance(optimizer, str) else update_rule(optimizer)
    if rule not in ("sgd", "adam"):
        raise ParametrizationError(f"optimizer rule {rule!r} is not 'sgd' or 'adam'.")
    layers, width = anatomy(model)
    out = []
    for name, m, role in layers:
        fan_in = int(math.prod(m.weight.shape[1:]))
        g, std, lr_scale = scales(role, param, fan_in, width, rule)
        out.append(LayerScale(name, role, fan_in, g, std, lr_scale))
    return out


def check_applicable(
    model: nn.Module, param: str, optimizer_cls: type[torch.optim.Optimizer]
) -> None:
    """Raise ``ParametrizationError`` now if ``apply`` would refuse this combination.

    Changes nothing and draws no random numbers, so a sweep can call it on a model built on the
    ``meta`` device before any job trains.
    """
    if param != "sp":
        layer_scales(model, param, optimizer_cls)


def mupify(
    model: nn.Module, optimizer: torch.optim.Optimizer, param: str, verbose: bool = False
) -> None:
    """Rescale ``model`` and ``optimizer`` in place to the parametrization ``param``.

    mupify's API: call it right after building the model and its optimizer, before the first
    step. Layers are re-initialized from torch's global RNG; ``nn.Linear``/``nn.Conv2d`` layers
    become ``ParametrizedLinear``/``ParametrizedConv2d`` holding the same parameters;
    ``nn.ReLU`` modules become ``ScaledReLU``. Each of the optimizer's param groups is split by
    layer, keeping its hyperparameters, with ``lr`` times the layer's LR scale and
    ``weight_decay`` divided by it. Works with any torch optimizer: the LR rule follows its
    update type (``OPTIMIZER_RULES``); ``param="sp"`` changes nothing. A model can be
    parametrized once: a second call raises. Create LR schedulers after this call, since it
    rebuilds the param groups.
    """
    if param == "sp":
        return
    if model in _PARAMETRIZED:
        raise ParametrizationError(
            f"this model is already parametrized ({_PARAMETRIZED[model]!r}); a second mupify "
            "would rescale it twice. If a post_init_fn calls mupify, set PARAMETRIZATION='sp' "
            "(or drop the call): the engine already applies PARAMETRIZATION itself."
        )
    if model in _RESCALED:
        raise ParametrizationError(
            "rescale() was already called on this model; call mupify first, then rescale, "
            "since mupify resets the readout multiplier."
        )
    # Adagrad fills its state at construction, with step 0; a state without a step count is
    # taken as stepped
    if any(float(s.get("step", 1)) > 0 for s in optimizer.state.values()):
        raise ParametrizationError(
            "the optimizer has already taken steps; mupify re-initializes the model, so call "
            "it right after building the model and optimizer."
        )
    table = layer_scales(model, param, type(optimizer))
    if verbose:
        print(_format_table(table))
    layers = {name: m for name, m in weight_layers(model)}
    converted = {}
    with torch.no_grad():
        for row in table:
            layer = _parametrized(layers[row.name])
            layer.multiplier.fill_(row.multiplier)
            layer.weight.normal_(0.0, row.init_std)
            if layer.bias is not None:
                layer.bias.normal_(0.0, row.init_std)
            converted[layers[row.name]] = layer
    relus = {m: ScaledReLU(RELU_GAIN, m.inplace) for m in model.modules() if type(m) is nn.ReLU}
    _replace_modules(model, {**converted, **relus})
    _regroup(optimizer, [(list(converted[layers[r.name]].parameters()), r.lr_scale) for r in table])
    _PARAMETRIZED[model] = param


def lr_gamma_factor(gamma: float) -> float:
    """The seed's richness rule for the learning rate: GAMMA**2 below 1, GAMMA above."""
    return gamma**2 if gamma < 1 else gamma


def rescale(model: nn.Module, gamma: float, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Apply richness ``gamma`` in place, as the engine does for GAMMA: divide the readout's
    output by ``gamma`` and, when ``optimizer`` is given, multiply every group's ``lr`` by
    ``gamma**2`` (gamma < 1) or ``gamma`` (gamma >= 1).

    For your own training loop only: the sweep applies GAMMA itself, so do not call this in a
    ``post_init_fn`` unless GAMMA is 1. Call it after ``mupify``; each call divides again.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}.")
    layers = weight_layers(model)
    if not layers:
        raise ParametrizationError(
            f"{type(model).__name__} has no nn.Linear/nn.Conv2d layer to use as the readout."
        )
    name, readout = layers[-1]
    if type(readout) in (nn.Linear, nn.Conv2d):
        converted = _parametrized(readout)
        _replace_modules(model, {readout: converted})
        readout = converted
    with torch.no_grad():
        readout.multiplier.div_(gamma)
    if optimizer is not None:
        factor = lr_gamma_factor(gamma)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
    _RESCALED.add(model)


def apply(
    model: nn.Module,
    param: str,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    opt_kwargs: dict,
) -> torch.optim.Optimizer:
    """The engine's entry point: the optimizer for ``model`` under ``param``.

    ``"sp"`` is a plain ``optimizer_cls(model.parameters(), lr=lr, **opt_kwargs)`` and leaves the
    model as built; any other parametrization is that optimizer passed through ``mupify``.
    ``lr`` already carries GAMMA's factor.
    """
    optimizer = optimizer_cls(model.parameters(), lr=lr, **opt_kwargs)
    mupify(model, optimizer, param)
    return optimizer


def parametrization_of(model: nn.Module) -> str:
    """The parametrization ``mupify``/``apply`` gave ``model`` (``"sp"`` if none)."""
    return _PARAMETRIZED.get(model, "sp")


def _parametrized(layer: nn.Module) -> nn.Module:
    """A ``Parametrized*`` twin of ``layer`` that holds the very same parameter objects."""
    if type(layer) in (ParametrizedLinear, ParametrizedConv2d):
        return layer
    factory = {"device": "meta", "dtype": layer.weight.dtype}
    if type(layer) is nn.Linear:
        twin: nn.Module = ParametrizedLinear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, **factory
        )
    else:
        twin = ParametrizedConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            **factory,
        )
    twin.weight = layer.weight
    twin.bias = layer.bias
    twin.multiplier = torch.ones((), dtype=layer.weight.dtype, device=layer.weight.device)
    twin.train(layer.training)
    return twin


def _replace_modules(model: nn.Module, mapping: dict[nn.Module, nn.Module]) -> None:
    """Point every parent of an old module at its replacement (keeps child order and names)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child in mapping:
                setattr(parent, child_name, mapping[child])


def _regroup(
    optimizer: torch.optim.Optimizer, layers: Sequence[tuple[list[nn.Parameter], float]]
) -> None:
    """Split each param group by layer: ``lr * s``, ``weight_decay / s``, other keys kept."""
    scale_of = {p: s for params, s in layers for p in params}
    layer_of = {p: i for i, (params, _) in enumerate(layers) for p in params}
    new_groups = []
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        by_layer: dict[int, list[nn.Parameter]] = {}
        untouched = []
        for p in group["params"]:
            if p in layer_of:
                by_layer.setdefault(layer_of[p], []).append(p)
            else:
                untouched.append(p)
        for i in sorted(by_layer):
            s = scale_of[by_layer[i][0]]
            new = {**hyper, "params": by_layer[i], "lr": hyper["lr"] * s}
            if "weight_decay" in hyper:
                new["weight_decay"] = hyper["weight_decay"] / s
            new_groups.append(new)
        if untouched:
            new_groups.append({**hyper, "params": untouched})
    optimizer.param_groups.clear()
    for group in new_groups:
        optimizer.add_param_group(group)


def _format_table(table: list[LayerScale]) -> str:
    lines = [f"{'layer':<24} {'role':<8} {'fan_in':>7} {'mult':>10} {'init std':>10} {'lr x':>10}"]
    for r in table:
        lines.append(
            f"{r.name:<24} {r.role:<8} {r.fan_in:>7} {r.multiplier:>10.4g} "
            f"{r.init_std:>10.4g} {r.lr_scale:>10.4g}"
        )
    return "\n".join(lines)
