"""Settings: dataclasses whose fields are checked against their annotations, and whose field
docstrings are the command line's --help.

Every group of settings in saekit (the data, each kind of autoencoder, the optimisation, the
run, the classifier) is a dataclass deriving from `Settings`. Its annotations are the one
source of the allowed values: `int`, `float`, `bool`, `str`, `X | None`, or `Literal[...]` for
a choice. `__post_init__` checks every field against its annotation, then asks the class for
its own problems (ranges, combinations), and raises one `UserError` that lists them all. The
checks read nothing of the machine: a setting that is valid here is valid everywhere.
"""

import ast
import dataclasses
import inspect
import math
import types
import typing

from .errors import UserError


def dashed(name: str) -> str:
    """A field's name as the command line spells it: n_hidden -> n-hidden."""
    return name.replace("_", "-")


def choices(annotation) -> tuple | None:
    """The allowed values of a Literal annotation (also inside `| None`), else None."""
    for arg in _alternatives(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def value_type(annotation):
    """The command-line type of a field: int, float, bool or str (a Literal's values are str)."""
    for arg in _alternatives(annotation):
        if arg is not type(None):
            return str if typing.get_origin(arg) is typing.Literal else arg
    raise TypeError(f"no value type in {annotation}")


def _alternatives(annotation) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _matches(value, annotation) -> bool:
    if typing.get_origin(annotation) is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if isinstance(value, bool):  # bool is an int in Python, but not a number of examples
        return annotation is bool
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)


def _describe(annotation) -> str:
    names = []
    for arg in _alternatives(annotation):
        if typing.get_origin(arg) is typing.Literal:
            names.append("one of " + ", ".join(map(str, typing.get_args(arg))))
        else:
            names.append("None" if arg is type(None) else arg.__name__)
    return " or ".join(names)


def hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def accepts(cls: type, name: str, value) -> bool:
    """Whether the field `name` of settings class cls can hold value (by its annotation)."""
    return any(_matches(value, a) for a in _alternatives(hints(cls)[name]))


@dataclasses.dataclass
class Settings:
    """Base of every settings dataclass: checked on creation (see the module docstring)."""

    def __post_init__(self):
        problems = self.type_problems()
        if not problems:  # range checks below assume the types are right
            problems = self.problems()
        if problems:
            raise UserError("invalid configuration: " + "; ".join(problems) + ".")

    def type_problems(self) -> list[str]:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not accepts(type(self), f.name, value):
                problems.append(f"--{dashed(f.name)} must be {_describe(hints(type(self))[f.name])} (got {value!r})")
        return problems

    def problems(self) -> list[str]:
        """This group's own checks beyond the types: ranges and combinations. Override to add."""
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- helpers for problems()

    def at_least(self, low, *names: str) -> list[str]:
        """Problems for each named number below `low` (NaN included); whole numbers are named so."""
        problems = []
        for name in names:
            value = getattr(self, name)
            if not value >= low:
                kind = "a whole number" if isinstance(value, int) else "a number"
                problems.append(f"--{dashed(name)} must be {kind} >= {low:g} (got {value!r})")
        return problems

    def from_zero_below_one(self, *names: str) -> list[str]:
        """Problems for each named number outside [0, 1) (NaN included): decay rates, momenta."""
        return [
            f"--{dashed(name)} must lie in [0, 1) (got {getattr(self, name)!r})"
            for name in names
            if not 0 <= getattr(self, name) < 1
        ]

    def finite(self, *names: str) -> list[str]:
        """Problems for each named number that is infinite or NaN (training would be meaningless)."""
        return [
            f"--{dashed(name)} must be finite (got {getattr(self, name)!r})"
            for name in names
            if not math.isfinite(getattr(self, name))
        ]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field of cls and its bases, read from the source, on one line."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is Settings:
            continue
        (definition,) = ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass))).body
        assert isinstance(definition, ast.ClassDef)
        body = definition.body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs
