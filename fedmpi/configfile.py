"""Reading a config file as hostile input: a regular UTF-8 file of bounded size holding plain YAML.

A config is a flat mapping of keys to scalars. Nothing in it needs YAML's graph features, and those
are what turn a few bytes into gigabytes (aliases of aliases: "billion laughs") or into unbounded
recursion (deep nesting). So anchors, aliases and tags other than the core scalar ones are refused,
and nesting is capped, in a first pass over the parser's events, before any node is built: the work
is linear in the file's size, which is capped too.

Plain scalars stay text (only `null`, `~` and an empty value become None): each key's type reads
its value (config.py), so a file and `--set` read `1e-3`, `010` or `yes` the same way, without
YAML 1.1's guesses (octal, sexagesimal, booleans, dates).
"""
from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from .errors import ConfigError

MAX_CONFIG_BYTES = 64 << 10  # a config with every key and a comment on each is about 4 KB
MAX_DEPTH = 3                # the mapping, a value, one level inside a value (its key's type refuses it)
CORE_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq")}
NULL_TAG = "tag:yaml.org,2002:null"

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when installed: the same events, faster


class ConfigLoader(_Base):  # type: ignore[misc, valid-type]
    """SafeLoader whose only implicit type is null: every other plain scalar is a string."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag == NULL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    if any(tag == NULL_TAG for tag, _ in resolvers)}


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def read_config_file(path: str) -> str:
    """The text of config file `path`: refused unless a regular file of at most MAX_CONFIG_BYTES of UTF-8."""
    try:
        info = os.stat(path)
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read config file {path}: {getattr(err, 'strerror', None) or err}") from None
    _check_regular(path, info)
    try:
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the open; fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        _check_regular(path, os.fstat(f.fileno()))
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a config needs a few KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"config file {path} is not UTF-8 text: byte {data[err.start]:#04x} on line {line} "
                          f"(save it as UTF-8)") from None


def _check_regular(path: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"config file {path} is {kind_of(info.st_mode)}, not a regular file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {info.st_size:,} bytes, more than the {MAX_CONFIG_BYTES // 1024} KiB "
                          f"a config may have (a config needs a few KB)")


def parse_config_text(text: str, where: str) -> Any:
    """The YAML document in `text` (a config file's), checked event by event before it is built."""
    try:
        _check_events(text, where)
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{where} is not valid YAML: {first}") from None
    except (ValueError, OverflowError) as err:  # an explicit !!int of 5000 digits, and the like
        raise ConfigError(f"{where}: a value cannot be read ({err})") from None


def _check_events(text: str, where: str) -> None:
    """Refuse anchors, aliases, unusual tags, nesting beyond MAX_DEPTH and repeated top-level keys."""
    open_items: list[list] = []  # per open collection: [is a mapping, items seen]
    keys: dict[str, int] = {}
    documents = 0
    for event in yaml.parse(text, Loader=ConfigLoader):
        line = event.start_mark.line + 1 if event.start_mark else 0
        documents += isinstance(event, yaml.DocumentStartEvent)
        if documents > 1:
            raise ConfigError(f"{where}, line {line}: a second YAML document (---); a config is one mapping")
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConfigError(f"{where}, line {line}: YAML anchors and aliases (&name, *name) are not allowed "
                              f"in a config; write each value out")
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in CORE_TAGS:
            raise ConfigError(f"{where}, line {line}: YAML tag {tag[:60]!r} is not allowed in a config")
        if isinstance(event, yaml.CollectionEndEvent):
            open_items.pop()
            continue
        if not isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            continue
        _check_top_key(event, open_items, keys, where, line)
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_items) >= MAX_DEPTH:
                raise ConfigError(f"{where}, line {line}: nested deeper than {MAX_DEPTH} levels; "
                                  f"a config is a flat mapping of keys to values")
            open_items.append([isinstance(event, yaml.MappingStartEvent), 0])


def _check_top_key(event: yaml.NodeEvent, open_items: list[list], keys: dict[str, int], where: str, line: int) -> None:
    """A key of the top-level mapping must be a plain word, given once."""
    if not open_items:
        return
    is_mapping, seen = open_items[-1]
    open_items[-1][1] += 1
    if len(open_items) != 1 or not is_mapping or seen % 2:
        return
    if not isinstance(event, yaml.ScalarEvent):
        raise ConfigError(f"{where}, line {line}: a config key must be a plain word, not a list or mapping")
    if event.value in keys:
        raise ConfigError(f"{where}, line {line}: key {event.value[:60]!r} is given twice (first on line "
                          f"{keys[event.value]})")
    keys[event.value] = line
