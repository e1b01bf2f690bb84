"""What each config key affects, declared once next to the key (`key(Effect.x)` in a schema dataclass).

Every place that must know whether a key changes what trains reads the declaration instead of keeping a list:
the W&B/MLflow tags and run names leave out `location` keys, a resume refuses a changed key that defines what the
checkpoint holds, adapter metadata carries what the adapter is and was trained on, and a sweep fuses jobs that
differ only in keys that leave the base model and the batch stream alone (runner/fuse.py).

    effect          what it changes                                          resume        fusable  name/tag
    base            the frozen base model: weights, dtype, quantization      refused       no       yes
    data            which rows train, in which order and shape               refused       no       yes
    batching        rows per optimizer step and how they are split           product kept  no       yes
    adapter         what trains on the base: LoRA shape, init, dtype         refused       yes      yes
    optimization    how the adapter is updated: lr, schedule, steps, guard   allowed       yes      yes
    implementation  the same computation by other means (kernels, compile,   allowed       no       yes
                    checkpointing, parallelism, the memory plan)
    reporting       what is measured and recorded, not what trains           allowed       yes      yes
    location        where a run reads and writes, how its console looks      ignored       yes      no

A key whose change a resume must refuse although its effect allows it (the optimizer's kind: its states do not
carry over) says so with `resume="refuse"`. The schema is closed (qlora_lab/closed.py: a key it lacks is refused, `+`
or not); a field deliberately open to keys of its own (`model.build`: a transformers config) says so with
`open="<what checks those keys>"`.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any, Iterator, get_type_hints

from omegaconf import MISSING


class Effect(StrEnum):
    base = "base"
    data = "data"
    batching = "batching"
    adapter = "adapter"
    optimization = "optimization"
    implementation = "implementation"
    reporting = "reporting"
    location = "location"

    @property
    def computes(self) -> bool:
        """Whether a change of the key changes the numbers a run computes (beyond rounding of other kernels)."""
        return self in (Effect.base, Effect.data, Effect.batching, Effect.adapter, Effect.optimization)

    @property
    def fusable(self) -> bool:
        """Whether jobs of a sweep that differ in this key can train together on one base and one batch stream."""
        return self in (Effect.adapter, Effect.optimization, Effect.reporting, Effect.location)

    @property
    def named(self) -> bool:
        """Whether an override of the key names a run and tags it (a location never does)."""
        return self is not Effect.location

    @property
    def describes_adapter(self) -> bool:
        """Whether the key says what an adapter is and what it was trained on (its artifact's metadata)."""
        return self in (Effect.base, Effect.data, Effect.adapter)


RESUME = {Effect.base: "refuse", Effect.data: "refuse", Effect.adapter: "refuse", Effect.batching: "product",
          Effect.optimization: "allow", Effect.implementation: "allow", Effect.reporting: "allow",
          Effect.location: "ignore"}


def key(effect: Effect, *, resume: str | None = None, open: str | None = None) -> Any:
    """A schema field with no default (defaults live in conf/) and its declared effect; `open`: the field (a dict)
    takes keys the schema does not list, and says what checks them instead."""
    meta: dict[str, Any] = {"effect": Effect(effect)}
    if resume is not None:
        assert resume in ("refuse", "allow"), resume
        meta["resume"] = resume
    if open is not None:
        meta["open"] = open
    return dataclasses.field(default=MISSING, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Declared:
    effect: Effect
    resume: str  # refuse | product | allow | ignore
    open: str | None = None  # a dict field open to keys of its own: what checks them


def _declared(f: dataclasses.Field) -> Declared | None:
    effect = f.metadata.get("effect")
    return None if effect is None else Declared(effect, f.metadata.get("resume", RESUME[effect]),
                                                f.metadata.get("open"))


def _is_schema(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj)


def declarations(root: Any, prefix: str = "") -> Iterator[tuple[str, Declared]]:
    """(dotted key, declaration) for every leaf field of a schema instance or class; a field holding a dataclass
    (a group) recurses into it, a dict of dataclasses (the sinks) into each."""
    hints = get_type_hints(root if isinstance(root, type) else type(root))
    for f in dataclasses.fields(root):
        name = prefix + f.name
        value = getattr(root, f.name, None) if not isinstance(root, type) else None
        if _is_schema(value):
            yield from declarations(value, name + ".")
        elif isinstance(value, dict) and value and all(_is_schema(v) for v in value.values()):
            for k, v in value.items():
                yield from declarations(v, f"{name}.{k}.")
        elif isinstance(root, type) and isinstance(hints.get(f.name), type) and _is_schema(hints[f.name]):
            yield from declarations(hints[f.name], name + ".")
        else:
            d = _declared(f)
            if d is not None:
                yield name, d


def effects(root: Any) -> dict[str, Declared]:
    """The declaration of every key of `root` (a config instance: the fields of its actual groups, e.g. the chosen
    quantization backend's)."""
    return dict(declarations(root))


def declared(table: dict[str, Declared], dotted: str) -> Declared | None:
    """The declaration of `dotted` in `table`: the key itself, or the field it lies under (`model.build.hidden_size`
    under `model.build`); for a group (`quantization`, as in the override `quantization=nf4`) the most binding
    declaration among its keys. None for a key the schema does not know."""
    if dotted in table:
        return table[dotted]
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in table:
            return table[head]
    under = [d for k, d in table.items() if k.startswith(dotted + ".")]
    if not under:
        return None
    order = list(Effect)  # base first: a group is as binding as its most binding key
    return min(under, key=lambda d: order.index(d.effect))
