"""One declaration per option: a config field carries its help, flag, choices and range.

`labelfew.config` declares every command's fields with `option(...)`; the CLI (`labelfew.cli`)
builds its commands from those fields, `validate` checks a config before any work (a bad value
is a `UserError`, exit 2), and `markdown_table` writes README's option tables, which a test
compares with the configs. `python -m labelfew.options README.md` regenerates them in place.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import tomllib
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from labelfew.errors import UserError

__all__ = ["Option", "field_options", "markdown_table", "merge", "option", "read_recipe", "validate"]


@dataclass(frozen=True)
class Option:
    """What the CLI, the validation and the README need to know about one config field.

    Attributes:
        help: one sentence for `-h` and the README's "meaning" column.
        flag: the long flag; empty: `--` + the field name with hyphens (`batch_size` -> `--batch-size`).
        short: a one-letter alias such as `-k`.
        argument: a positional argument (`labelfew pretrain DATA`) instead of an option.
        choices: the allowed strings (`--optimizer lars|sgd|adamw`).
        minimum, maximum: inclusive bounds of a number.
        above, below: exclusive bounds of a number (`--temperature` above 0).
        toggle: for a bool, a `--x/--no-x` pair; False: a single `--x` flag that turns it on.
        infinite: whether a float may be inf (or nan); off for every option unless declared, since
            no setting means "infinity" and `--lr inf` would otherwise fail only after the data is read.
        shown: the default as `-h` and the README show it, where the value alone does not say
            it (`None` meaning "the median side of the images").
        hint: what to do when the value is out of range, instead of the generated sentence.
    """

    help: str
    flag: str = ""
    short: str = ""
    argument: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    toggle: bool = True
    infinite: bool = False
    shown: str = ""
    hint: str = ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (None: nothing); types are checked by the CLI and the recipe.

        A repeatable option (a tuple of strings, `--logger tensorboard --logger mlflow`) checks each value.
        """
        if isinstance(value, tuple | list):
            return next((self.problem(each) for each in value if self.problem(each)), None)
        if isinstance(value, str) and self.choices and value not in self.choices:
            return f"use one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not self.infinite and not math.isfinite(value):
            return f"use a finite number{'' if self.rule() == 'any value' else ', ' + self.rule()}"
        low_ok = (self.minimum is None or value >= self.minimum) and (
            self.above is None or value > self.above
        )
        high_ok = (self.maximum is None or value <= self.maximum) and (
            self.below is None or value < self.below
        )
        if low_ok and high_ok:
            return None
        return self.hint or f"use {self.rule()}"

    def rule(self) -> str:
        """The allowed range in words: `at least 1`, `a positive value`, `a value in [0, 1)`."""
        low = self.minimum if self.minimum is not None else self.above
        high = self.maximum if self.maximum is not None else self.below
        if low is not None and high is not None:
            opening = "[" if self.minimum is not None else "("
            closing = "]" if self.maximum is not None else ")"
            return f"a value in {opening}{_number(low)}, {_number(high)}{closing}"
        if self.minimum is not None:
            return f"at least {_number(self.minimum)}"
        if self.above is not None:
            return "a positive value" if self.above == 0 else f"a value above {_number(self.above)}"
        if self.maximum is not None:
            return f"at most {_number(self.maximum)}"
        return f"a value below {_number(self.below)}" if self.below is not None else "any value"


def option(default: Any = MISSING, like: Option | None = None, **settings: Any) -> Any:
    """A dataclass field with its `Option` (see there for the settings); no default: required.

    `like`: a shared declaration (`QUIET`), with `settings` changing parts of it.
    """
    spec = dataclasses.replace(like, **settings) if like is not None else Option(**settings)
    return dataclasses.field(default=default, metadata={"option": spec})


def field_options(config_class: type) -> list[tuple[dataclasses.Field[Any], Option, Any]]:
    """(field, its Option, its evaluated type) for every field of a config class, in order."""
    types = typing.get_type_hints(config_class)
    found = []
    for item in fields(config_class):
        spec = item.metadata.get("option")
        # a field declared without option(...) still reaches the CLI; tests/test_config.py asks for its help
        found.append((item, spec if isinstance(spec, Option) else Option(help=""), types[item.name]))
    return found


def flag_of(name: str, spec: Option) -> str:
    """The long flag of a field: `--batch-size`, or the declared one (`--from` for `source`)."""
    return spec.flag or "--" + name.replace("_", "-")


def validate(config: Any) -> None:
    """Checks choices and ranges of every field.

    Raises:
        UserError: the first bad value, naming its flag (`--optimizer foo: use one of lars, sgd, adamw`).
    """
    for item in fields(config):
        spec = item.metadata.get("option")
        value = getattr(config, item.name)
        problem = spec.problem(value) if isinstance(spec, Option) else None
        if problem and isinstance(value, tuple | list):  # name the value that is wrong
            value = next(each for each in value if spec.problem(each))  # type: ignore[union-attr]
        if problem:
            raise UserError(f"{flag_of(item.name, spec)} {value}: {problem}")  # type: ignore[arg-type]


def read_recipe(path: Path | None, sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Reads a recipe TOML file into {section: {field: value}}; `sections`: the ones commands read.

    Raises:
        UserError: missing file, TOML syntax error, or an unknown section.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--recipe {path}: no such file (recipes are TOML files, see recipes/)")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--recipe {path}: not valid TOML ({error})") from None
    unknown = set(recipe) - set(sections) - {"recipe", "benchmark"}  # [benchmark]: benchmarks/
    if unknown:
        raise UserError(
            f"--recipe {path}: unknown section(s) {sorted(unknown)}; use [pretrain], [finetune], [evaluate]"
        )
    not_tables = [name for name, value in recipe.items() if not isinstance(value, dict)]
    if not_tables:
        raise UserError(
            f"--recipe {path}: {', '.join(not_tables)} must be a [section] table of settings, not a value"
        )
    return recipe


def merge(
    config_class: type, section_name: str | None, recipe: dict[str, dict[str, Any]], options: dict[str, Any]
) -> Any:
    """Defaults < the recipe's `section_name` table < options that are not None; validated when made.

    Raises:
        UserError: an unknown recipe key, a recipe value of the wrong type, or a bad value
            (a choice or range of `labelfew.options.Option`), before any work is done.
    """
    section = dict(recipe.get(section_name or "", {}))
    names = {item.name: item for item in fields(config_class)}
    unknown = set(section) - set(names)
    if unknown:
        raise UserError(
            f"recipe [{section_name}]: unknown key(s) {sorted(unknown)}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    for key, value in section.items():
        _check_recipe_value(section_name or "", key, str(names[key].type), value)
    values = {**section, **{key: value for key, value in options.items() if value is not None}}
    for key, value in values.items():
        if "Path" in str(names[key].type) and isinstance(value, str):
            values[key] = Path(value)
    return config_class(**values)


_RECIPE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "Path": (str,),
}


def _check_recipe_value(section: str, key: str, annotation: str, value: Any) -> None:
    """Refuses a recipe value of the wrong TOML type (`epochs = "100"`), which would otherwise fail
    deep inside a run; annotations are strings such as `int | None` (postponed evaluation)."""
    allowed = [_RECIPE_TYPES.get(part.strip()) for part in annotation.split("|") if part.strip() != "None"]
    if any(kinds is None for kinds in allowed):
        return  # a type this check does not know: leave it to the dataclass
    kinds = tuple(kind for group in allowed if group for kind in group)
    is_bool = isinstance(value, bool)
    if not isinstance(value, kinds) or (is_bool and bool not in kinds):
        expected = " or ".join(part.strip() for part in annotation.split("|") if part.strip() != "None")
        raise UserError(f"recipe [{section}] {key} = {value!r}: expected {expected}; fix the recipe file")


def default_text(item: dataclasses.Field[Any], spec: Option) -> str:
    """The default as the README and `-h` show it."""
    if spec.shown:
        return spec.shown
    value = item.default
    if value is MISSING:
        return "required"
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, tuple):
        return ", ".join(str(each) for each in value)
    return str(value)


def shown_flags(name: str, spec: Option, annotation: Any) -> str:
    """The flag(s) as a user types them: `--blur/--no-blur`, `-k/--top-k`, `--restart`."""
    long = flag_of(name, spec)
    if _is_bool(annotation) and spec.toggle:
        return f"{long}/--no-{long.removeprefix('--')}"
    return f"{spec.short}/{long}" if spec.short else long


def markdown_table(config_class: type, recipe: bool) -> str:
    """README's `| option | default | meaning |` table of a command (positional arguments left out)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    if recipe:
        rows.append("| `--recipe FILE` | — | a TOML recipe (`recipes/`); options given here override it |")
    for item, spec, annotation in field_options(config_class):
        if not spec.argument:
            flags = shown_flags(item.name, spec, annotation)
            rows.append(f"| `{flags}` | {default_text(item, spec)} | {spec.help} |")
    return "\n".join(rows)


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def _number(value: float) -> str:
    return format(value, "g")


TABLE = re.compile(r"<!-- options: (\w+) -->\n(?:\|[^\n]*\n)*<!-- end options -->")  # only table rows inside


def readme_tables(text: str, tables: dict[str, str]) -> str:
    """README text with every `<!-- options: NAME -->` block's rows replaced by `tables[NAME]`."""
    return TABLE.sub(
        lambda match: f"<!-- options: {match[1]} -->\n{tables[match[1]]}\n<!-- end options -->", text
    )


def main(readme: Path) -> None:
    """Rewrites README's option tables from the configs."""
    from labelfew.config import command_tables

    readme.write_text(readme_tables(readme.read_text(encoding="utf-8"), command_tables()), encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
