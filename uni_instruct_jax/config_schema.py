"""The config schema: one description and valid range per field, read by validation and printing.

The schema itself is `SCHEMA` in configs/default.py: a dict from dotted field name
('training.batch_size') to `Field(default, description, valid)`, and `RULES` there holds the
cross-field rules. This module holds the machinery:

  validate(config)   ConfigError (one line naming the key and its valid values) on the first
                     field outside its documented range/choices/type or a broken rule.
  describe(config)   one line per field: name = value  # description; valid values.
  undocumented(config)  dotted names of the config's fields that have no schema entry (a test
                     keeps this empty for every configs/*.py; not enforced at runtime).

`valid` is an interval '[lo, hi]' / '(lo, hi)' (either side open or closed, 'inf' allowed) for
numbers (element-wise for tuples), a tuple of allowed values, or '' (any value of the type).
NaN is outside every interval; inf only inside one closed at inf.
"""

import dataclasses
import difflib
import functools
import math
import pathlib
import re
import runpy
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import ml_collections

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


class ConfigError(ValueError):
  """A config value outside its documented range, of the wrong type, or breaking a rule."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default (or only its type: int, float, bool, str, tuple, when the
  value is set elsewhere or only by some configs), one-line description and valid values."""
  default: Any
  doc: str
  valid: Any = ""

  def __post_init__(self):
    if isinstance(self.valid, str) and self.valid and not _INTERVAL.match(self.valid):
      raise ValueError(f"Field valid {self.valid!r} is not an interval like '[0, inf)'")

  @property
  def has_default(self) -> bool:
    return not isinstance(self.default, type)

  @property
  def kind(self) -> type:
    return self.default if isinstance(self.default, type) else type(self.default)

  def requirement(self) -> str:
    """'an int in [1, inf)', 'one of 'a', 'b'', 'a bool', ... (the printed valid values)."""
    if isinstance(self.valid, tuple):
      return "one of " + ", ".join(repr(v) for v in self.valid)
    kind = {int: "an int", float: "a number", bool: "a bool", str: "a string",
            tuple: f"a tuple of {'ints' if self._int_elements() else 'numbers'}"}[self.kind]
    return f"{kind} in {self.valid}" if self.valid else kind

  def _int_elements(self) -> bool:
    return (self.kind is tuple and self.has_default and bool(self.default)
            and all(_is_int(v) for v in self.default))

  def error(self, value: Any) -> Optional[str]:
    """None when `value` is valid, else what it must be."""
    if isinstance(self.valid, tuple):
      return None if value in self.valid else self.requirement()
    if self.kind is tuple:
      ok = isinstance(value, (tuple, list)) and all(
          (_is_int(v) if self._int_elements() else _is_number(v)) and self._in_interval(v)
          for v in value)
    elif self.kind is float:
      ok = _is_number(value) and self._in_interval(value)
    elif self.kind is int:
      ok = _is_int(value) and self._in_interval(value)
    else:
      ok = isinstance(value, self.kind)
    return None if ok else self.requirement()

  def _in_interval(self, x) -> bool:
    if not self.valid:
      return not math.isnan(x)
    left, lo, hi, right = _INTERVAL.match(self.valid).groups()
    lo, hi = float(lo), float(hi)
    above = x >= lo if left == "[" else x > lo
    below = x <= hi if right == "]" else x < hi
    return above and below  # False for NaN


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A cross-field rule: `check(config)` is True when `name`'s value is consistent with the rest."""
  name: str
  check: Callable[[ml_collections.ConfigDict], bool]
  requirement: str


@functools.lru_cache(maxsize=None)
def load_schema(path: str = str(DEFAULT_CONFIG)) -> Tuple[Dict[str, Field], Tuple[Rule, ...]]:
  """(SCHEMA, RULES) of configs/default.py."""
  module = runpy.run_path(path)
  return module["SCHEMA"], tuple(module["RULES"])


def defaults(schema: Dict[str, Field]) -> ml_collections.ConfigDict:
  """The nested ConfigDict of the schema: every section named in it (in schema order), holding
  the fields that have a default; sections with no defaults here start empty."""
  config = ml_collections.ConfigDict()
  for name, field in schema.items():
    *sections, key = name.split(".")
    node = config
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    if field.has_default:
      node[key] = field.default
  return config


def leaves(config) -> Dict[str, Any]:
  """{dotted name: value} of every leaf field (sections are dicts/ConfigDicts), in order."""
  items = config.items() if hasattr(config, "items") else ()
  out = {}
  for key, value in items:
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update({f"{key}.{k}": v for k, v in leaves(value).items()})
    else:
      out[key] = value
  return out


def _field_error(name: str, value: Any, requirement: str) -> ConfigError:
  return ConfigError(f"config.{name}={value!r} is invalid: must be {requirement}")


def validate(config: ml_collections.ConfigDict, schema: Optional[Dict[str, Field]] = None,
             rules: Optional[Iterable[Rule]] = None) -> None:
  """Raises ConfigError (one line: key, value, valid values) for the first invalid field.

  Fields without a schema entry are not checked here (see `undocumented`).
  """
  if schema is None or rules is None:
    default_schema, default_rules = load_schema()
    schema = default_schema if schema is None else schema
    rules = default_rules if rules is None else rules
  values = leaves(config)
  for name, value in values.items():
    if name in schema:
      problem = schema[name].error(value)
      if problem:
        raise _field_error(name, value, problem)
  for rule in rules:
    if rule.name in values and not rule.check(config):
      raise _field_error(rule.name, values[rule.name], rule.requirement)


def undocumented(config: ml_collections.ConfigDict,
                 schema: Optional[Dict[str, Field]] = None) -> List[str]:
  """Dotted names of the config's leaves that have no schema entry."""
  schema = load_schema()[0] if schema is None else schema
  return [name for name in leaves(config) if name not in schema]


def describe(config: ml_collections.ConfigDict,
             schema: Optional[Dict[str, Field]] = None) -> str:
  """The resolved config, one line per field: `name = value  # description; valid values`.

  Fields follow the schema's order; any without an entry come last, marked undocumented.
  """
  schema = load_schema()[0] if schema is None else schema
  values = leaves(config)
  names = [n for n in schema if n in values] + [n for n in values if n not in schema]
  width = max((len(f"{n} = {values[n]!r}") for n in names), default=0)
  lines = []
  for name in names:
    text = f"{name} = {values[name]!r}".ljust(width)
    field = schema.get(name)
    lines.append(f"{text}  # {field.doc}; {field.requirement()}" if field
                 else f"{text}  # (undocumented)")
  return "\n".join(lines)


def closest_keys(name: str, config: ml_collections.ConfigDict, n: int = 3) -> List[str]:
  """Up to n dotted names of the config (fields and sections) most similar to `name`: those
  within 0.05 of the best difflib similarity ratio (at least 0.6), best first."""
  names = set()
  for leaf in leaves(config):
    parts = leaf.split(".")
    names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  scored = sorted(((difflib.SequenceMatcher(None, name, k).ratio(), k) for k in names),
                  key=lambda rk: (-rk[0], rk[1]))
  best = scored[0][0] if scored else 0.0
  return [k for r, k in scored[:n] if r >= max(0.6, best - 0.05)]
