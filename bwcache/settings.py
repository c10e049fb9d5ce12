"""Each cache setting described once, on its config field: type, range and labels. The config checks values with it;
the app's form, its API, the command line and the presets derive their fields from it.

    threshold: float = setting(0.15, "number", "δ (threshold)", "higher = more reuse, faster, lower fidelity",
                               low=0.0, form="main", form_high=1.0, widget="slider")

`Settings(config_class)` lists a config class's settings in field order; a subclass with one more described field is
all it takes for every surface to offer it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

KINDS = ("number", "integer", "choice", "flag", "blocks")
FORM_PLACES = ("main", "advanced")
# `indicator_blocks` named subsets (the "blocks" kind); a sequence of indices is the other spelling.
BLOCK_SUBSETS = ("all", "every_other")


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Setting:
    """One cache setting.

    `kind`: "number" (a float from `low` to `high`, `high` None: unbounded), "integer" (`low` ≤ n), "choice" (one of
    `choices`), "flag" (True or False) or "blocks" (block indices, or one of `BLOCK_SUBSETS`). `optional`: None is
    allowed, and `none_word` is how a form or a flag says it ("auto" for R). `form`: "main" or "advanced" offers the
    setting in the app's form, its API and the command line; None keeps it to the library and the presets.
    `form_high` narrows the app's range (δ's slider ends at 1), `widget` picks the app's control where the kind's
    default does not fit, `choice_labels` names the choices in the app.
    """

    kind: str
    label: str
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    choice_labels: Mapping[str, str] | None = None
    optional: bool = False
    none_word: str | None = None
    form: str | None = None
    form_high: float | None = None
    step: float | None = None
    widget: str | None = None
    # Presets and profiles may set it (a per-run value such as the step count is not a model's default).
    preset: bool = True
    name: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Setting kind must be one of {KINDS}, got {self.kind!r}.")
        if self.form not in (None, *FORM_PLACES):
            raise ValueError(f"Setting form must be None or one of {FORM_PLACES}, got {self.form!r}.")

    @property
    def flag(self) -> str:
        """The command-line option."""
        return "--" + self.name.replace("_", "-")

    @property
    def form_range(self) -> tuple[float | None, float | None]:
        return self.low, self.form_high if self.form_high is not None else self.high

    # -- the config's checks (messages name the field) ------------------------------------------------------

    def check(self, value: Any) -> Any:
        """`value` as the config stores it; a ValueError names the field and what is allowed."""
        name = self.name
        if value is None and self.optional:
            return None
        or_none = " or None" if self.optional else ""
        if self.kind == "number":
            if self.high is None:
                if not is_number(value):
                    raise ValueError(f"{name} must be a number ≥ {self.low:g}{or_none}, got {short_repr(value)}.")
                if not math.isfinite(value) or value < self.low:
                    raise ValueError(f"{name} must be a finite number ≥ {self.low:g}{or_none}, got {short_repr(value)}.")
            elif not is_number(value) or not self.low <= value <= self.high:
                raise ValueError(f"{name} must be between {self.low:g} and {self.high:g}{or_none}, got {short_repr(value)}.")
            return float(value)
        if self.kind == "integer":
            if not is_int(value) or value < self.low or (self.high is not None and value > self.high):
                upper = f" and ≤ {self.high}" if self.high is not None else ""
                raise ValueError(f"{name} must be an integer ≥ {self.low}{upper}{or_none}, got {short_repr(value)}.")
            return int(value)
        if self.kind == "choice":
            if value not in self.choices or not isinstance(value, str):
                none = "None or " if self.optional else ""
                raise ValueError(f"{name} must be {none}one of {self.choices}, got {short_repr(value)}.")
            return value
        if self.kind == "flag":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {short_repr(value)}.")
            return value
        return _block_indices(name, value)

    # -- what a form, an API call or a flag sends (messages name the field as the app labels it) -------------

    def parse(self, value: Any) -> Any:
        """A value as sent by the app, its API or the command line, checked: None (left empty: the preset's value),
        `none_word` (None) or the value. A ValueError names the field as the app labels it, and the allowed range."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if self.none_word is not None and isinstance(value, str) and value.strip().lower() == self.none_word:
            return self.none_word
        if self.kind == "number":
            low, high = self.form_range
            if not is_number(value) or not math.isfinite(value):
                raise ValueError(f"{self.label} must be a number{_range_text(low, high)}, got {short_repr(value)}.")
            if value < low or (high is not None and value > high):
                allowed = f"{low:g} to {high:g}" if high is not None else f"≥ {low:g}"
                raise ValueError(f"{self.label} = {value:g} is outside the allowed range {allowed}.")
            return float(value)
        if self.kind == "integer":
            return self._parse_integer(value)
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(f"{self.label} must be one of {', '.join(self.choices)}, got {short_repr(value)}.")
            return value
        if self.kind == "flag":
            if not isinstance(value, bool):
                raise ValueError(f"{self.label} must be true or false, got {short_repr(value)}.")
            return value
        return _block_indices(self.label, value)

    def _parse_integer(self, value: Any) -> int:
        auto = f'"{self.none_word}" or ' if self.none_word else ""
        upper = f" and at most {self.high}" if self.high is not None else ""
        refusal = f"{self.label} must be {auto}a whole number ≥ {self.low}{upper}, got {short_repr(value)}."
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(refusal) from None
        if not is_number(value) or not math.isfinite(value) or not float(value).is_integer():
            raise ValueError(refusal)
        value = int(value)
        if value < self.low or (self.high is not None and value > self.high):
            raise ValueError(refusal)
        return value

    def resolve(self, value: Any) -> Any:
        """A parsed value as the config takes it (`none_word` is None)."""
        return None if self.none_word is not None and value == self.none_word else value

    def form_value(self, value: Any) -> Any:
        """A config value as the app's control shows it (None as `none_word`)."""
        if value is None and self.none_word is not None:
            return self.none_word
        if self.kind == "number" and value is not None:
            return float(value)
        if self.kind == "integer" and value is not None and self.none_word is not None:
            return str(value)  # typed into a text box that also takes the word
        return value


def setting(default: Any, kind: str, label: str, help: str, **details) -> Any:
    """A config field described for every surface (see `Setting`)."""
    return dataclasses.field(default=default, metadata={"setting": Setting(kind, label, help, **details)})


class Settings:
    """The described settings of a config class, in field order."""

    def __init__(self, config_class: type):
        self.config_class = config_class
        self.all: tuple[Setting, ...] = tuple(
            dataclasses.replace(f.metadata["setting"], name=f.name)
            for f in dataclasses.fields(config_class) if "setting" in f.metadata
        )
        self._by_name = {s.name: s for s in self.all}

    def __iter__(self):
        return iter(self.all)

    def __getitem__(self, name: str) -> Setting:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def form(self) -> tuple[Setting, ...]:
        """The settings the app's form, its API and the command line offer."""
        return tuple(s for s in self.all if s.form)

    @property
    def preset_names(self) -> tuple[str, ...]:
        """The keys a preset's `bwcache` section and its profiles may hold."""
        return tuple(s.name for s in self.all if s.preset)

    def make(self, values: Mapping[str, Any]):
        """A config from setting values; an unknown name is refused with the allowed ones."""
        unknown = sorted(set(values) - set(self._by_name))
        if unknown:
            raise ValueError(f"Unknown cache setting(s) {unknown}; allowed: {sorted(self._by_name)}.")
        return self.config_class(**values)


@functools.cache
def settings_of(config_class: type) -> Settings:
    return Settings(config_class)


def _range_text(low, high) -> str:
    if low is None:
        return ""
    return f" from {low:g} to {high:g}" if high is not None else f" ≥ {low:g}"


def short_repr(value: Any, limit: int = 40) -> str:
    """`repr(value)` for a message, cut short: a user's value may be huge (1e308 as an integer) or hold control
    characters, which `repr` escapes. Numbers read as they are (no quotes)."""
    text = repr(value) if not isinstance(value, numbers.Number) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _block_indices(name: str, spec: Any):
    """None, a named subset, or a non-empty tuple of integer block indices."""
    if spec is None or spec in BLOCK_SUBSETS:
        return spec
    refusal = (f"{name} must be None, one of {BLOCK_SUBSETS} or a sequence of block indices, "
               f"got {short_repr(spec)}.")
    if isinstance(spec, str):
        raise ValueError(refusal)
    try:
        indices = tuple(spec)
    except TypeError:
        raise ValueError(refusal) from None
    if not indices or not all(is_int(i) for i in indices):
        raise ValueError(f"{name} must be a non-empty sequence of integer block indices, got {short_repr(spec)}.")
    return tuple(int(i) for i in indices)
