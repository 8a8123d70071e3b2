"""Every training hyper-parameter, with its help text, and the ``mfserve train`` flags built from them.

This module imports no torch, so ``mfserve --help`` lists the flags on the thin client install.
The defaults are the tuned recipe; docs/training.md says how each was chosen on a validation slice
of the training part.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _param(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of both heads. Every field is a ``mfserve train`` flag."""

    # --- rating head: mu + b_u + b_i + p_u . q_i, squared error, minibatch gradient descent ---
    factors: int = _param(32, "width of the rating head's user and item factors")
    epochs: int = _param(60, "most epochs of the rating head (early stopping usually ends at 7-10)")
    batch_size: int = _param(2048, "ratings per gradient step, sliced from a shuffled permutation")
    lr: float = _param(
        5e-3, "learning rate (sgd: per rating, on the summed batch loss; adam: mean loss)"
    )
    reg: float = _param(0.03, "L2 weight on the looked-up factor rows")
    bias_reg: float = _param(0.02, "L2 weight on the looked-up biases")
    init_std: float = _param(0.05, "init scale: std for normal, upper bound for uniform(0, x)")
    init: str = _param("normal", "factor initialisation", ("normal", "uniform"))
    use_biases: bool = _param(True, "learn the global mean and user/item biases")
    optimizer: str = _param("sgd", "optimiser of the rating head", ("sgd", "adam"))
    val_fraction: float = _param(
        0.1, "slice of the training rows held out for early stopping (0: none)"
    )
    patience: int = _param(
        3, "epochs without a better validation RMSE before stopping (0: never stop)"
    )
    seed: int = _param(42, "seed of every random draw; the same seed gives bit-identical tensors")
    implicit: bool = _param(
        True,
        "SVD++-style implicit terms (which items a user rated, which users rated an item), "
        "folded into the exported factors so serving stays a plain dot product",
    )
    # --- ranking head: implicit-feedback weighted MF (iALS), conjugate-gradient sweeps ---
    rank_head: str = _param(
        "ials", "ranking head for top-k ('none': rank by predicted rating)", ("ials", "none")
    )
    rank_factors: int = _param(64, "width of the ranking head's factors")
    rank_iters: int = _param(12, "alternating sweeps of the ranking head (user side + item side)")
    rank_cg_steps: int = _param(3, "conjugate-gradient steps per side per sweep (warm-started)")
    rank_alpha: float = _param(5.0, "confidence of an observed pair: 1 + alpha * weight")
    rank_reg: float = _param(50.0, "L2 weight of the ranking head")
    rank_weighting: str = _param(
        "rating", "weight of an observed pair: rating / max rating, or 1", ("rating", "binary")
    )
    rank_init_std: float = _param(0.01, "std of the ranking head's initial factors")

    @classmethod
    def reference(cls) -> TrainConfig:
        """The reference recipe: 8 factors, no biases, U(0, 0.05) init, Adam 1e-3, MSE, batch 128,
        128 epochs on all given rows (no validation slice, no early stopping, no ranking head)."""
        return cls(
            factors=8,
            epochs=128,
            batch_size=128,
            lr=1e-3,
            reg=0.0,
            bias_reg=0.0,
            init_std=0.05,
            init="uniform",
            use_biases=False,
            implicit=False,
            optimizer="adam",
            val_fraction=0.0,
            patience=0,
            rank_head="none",
        )


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """``--help`` that appends a flag's default once: not where its help already states it, and
    never a default that says nothing (None for "not given", False for an off switch, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        says_nothing = default is None or default is False or default in ([], ())
        if (
            "(default" in text
            or "%(default)" in text
            or says_nothing
            or default == argparse.SUPPRESS
            or action.required
            or not action.option_strings
        ):
            return action.help
        return f"{text} (default: %(default)s)"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field; unset flags keep the recipe's value (or, with
    ``--reference``, the reference recipe's: hence the default None, and the recipe's value in
    the help text)."""
    group = parser.add_argument_group("hyper-parameters (defaults: the tuned recipe)")
    defaults = TrainConfig()
    for spec in dataclasses.fields(TrainConfig):
        default = getattr(defaults, spec.name)
        kind = type(default)
        converter: Any = _parse_bool if kind is bool else kind
        group.add_argument(
            _flag(spec.name),
            dest=f"hp_{spec.name}",
            type=converter,
            default=None,
            choices=spec.metadata.get("choices"),
            metavar="BOOL" if kind is bool else spec.name.upper(),
            help=f"{spec.metadata['help']} (default: {default})",
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe (or the reference recipe with ``--reference``) with the given flags applied."""
    base = TrainConfig.reference() if getattr(args, "reference", False) else TrainConfig()
    overrides = {
        spec.name: getattr(args, f"hp_{spec.name}")
        for spec in dataclasses.fields(TrainConfig)
        if getattr(args, f"hp_{spec.name}", None) is not None
    }
    return dataclasses.replace(base, **overrides)
