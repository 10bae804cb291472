"""Bounded YAML (lockgate.yamlconf): no aliases, nesting <= MAX_YAML_DEPTH, <= MAX_YAML_NODES values,
<= MAX_YAML_BYTES of text. Anything either parses or raises ConfigError naming file:line:col, quickly."""

from __future__ import annotations

import re
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockgate import yamlconf
from lockgate.yamlconf import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, ConfigError, load_yaml, load_yaml_file

BOUND_S = 30.0  # catches a blow-up (an unbounded alias expansion runs for minutes), not speed: each case takes
# milliseconds, and 6 s was seen on a shared machine at load 10
WHERE = re.compile(r"^f\.yaml:\d+:\d+: ", re.M)


def parse_or_error(text):
    """(data, None) or (None, ConfigError); asserts it took < BOUND_S and nothing else was raised."""
    t0 = time.perf_counter()
    try:
        out = load_yaml(text, "f.yaml")[0], None
    except ConfigError as exc:
        out = None, exc
    assert time.perf_counter() - t0 < BOUND_S
    return out


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    names = "abcdefghijklmnopqrstuvwxyz"
    lines = [f'a: &a [{",".join(["x"] * width)}]']
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [{','.join([f'*{names[i - 1]}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.fixture(params=["libyaml", "python"])
def parser(request, monkeypatch):
    """Both event sources: libyaml (when PyYAML has it) and PyYAML's pure-Python parser."""
    if request.param == "python":
        monkeypatch.setattr(yamlconf, "_events", lambda text: yaml.parse(text, Loader=yaml.SafeLoader))
    elif not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML without libyaml")
    return request.param


def test_alias_bomb_refused_at_its_first_alias(parser):
    text = alias_bomb()
    assert len(text) < 400
    data, err = parse_or_error(text)
    assert data is None and "f.yaml:2:" in str(err) and "aliases are not allowed (*a)" in str(err)
    assert WHERE.match(str(err))


def test_alias_to_scalar_and_merge_keys_refused(parser):
    _, err = parse_or_error("a: &x 1\nb: *x\n")
    assert str(err).startswith("f.yaml:2:4: b: aliases are not allowed")
    _, err = parse_or_error("base: &b {x: 1}\nm:\n  <<: *b\n")
    assert "f.yaml:3:7" in str(err) and "aliases are not allowed" in str(err)
    _, err = parse_or_error("m:\n  <<: {x: 1}\n")
    assert "f.yaml:2:3: m: merge keys (<<) are not allowed" in str(err)


def test_anchor_without_alias_is_harmless(parser):
    assert parse_or_error("a: &x 1\nb: 2\n")[0] == {"a": 1, "b": 2}


@pytest.mark.parametrize("style", ["flow", "block-map", "block-seq"])
def test_deep_nesting_is_an_error_not_a_recursion_error(parser, style):
    n = 5000 if style == "flow" else 600  # block nesting grows quadratically: 600 levels are ~360 KB
    text = {"flow": "[" * n + "]" * n,
            "block-map": "".join("  " * i + "k:\n" for i in range(n)),
            "block-seq": "".join("  " * i + "-\n" for i in range(n))}[style]
    data, err = parse_or_error(text)
    assert data is None and WHERE.match(str(err))
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in str(err) or "maximum nesting depth" in str(err)


def test_nesting_at_the_limit_parses(parser):
    text = "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH
    data, err = parse_or_error(text)
    assert err is None
    for _ in range(MAX_YAML_DEPTH - 1):
        data = data[0]
    assert data == []
    _, err = parse_or_error("[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1))
    assert f"f.yaml:1:{MAX_YAML_DEPTH + 1}: " in str(err) and "nested deeper" in str(err)


def test_value_count_and_size_limits(parser, tmp_path, monkeypatch):
    limit = MAX_YAML_NODES
    if parser == "python":  # the pure-Python parser is slow: check the same code at a smaller limit
        limit = 2000
        monkeypatch.setattr(yamlconf, "MAX_YAML_NODES", limit)
    text = "[" + ",".join(["1"] * (limit + 10)) + "]"
    _, err = parse_or_error(text)
    assert f"more than {limit} values" in str(err) and WHERE.match(str(err))
    big = "a: '" + "x" * MAX_YAML_BYTES + "'\n"
    _, err = parse_or_error(big)
    assert f"f.yaml:1:{MAX_YAML_BYTES + 1}: <root>: larger than 1024 KiB" in str(err)
    p = tmp_path / "big.yaml"
    p.write_text("# filler\n" * (MAX_YAML_BYTES // 9 + 10))
    with pytest.raises(ConfigError, match=r"big\.yaml:\d+:\d+: <root>: larger than 1024 KiB"):
        load_yaml_file(p)


def test_non_utf8_file_names_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:7: <root>: file is not UTF-8 text \(byte 0xe9\)"):
        load_yaml_file(p)


@pytest.mark.parametrize("text, needle", [
    ("a: " + "9" * 5000, "f.yaml:1:4: a: invalid value: Exceeds the limit"),
    ("a: 2024-13-45", "f.yaml:1:4: a: invalid value: month must be in 1..12"),
    ("a: !!python/object:os.system x", "f.yaml:1:4: a: invalid value: could not determine a constructor"),
    ("a: b\x00c", "f.yaml:1:5: <root>: invalid YAML: unacceptable character"),
    ("a: 1\n---\nb: 2\n", "f.yaml:2:1: <root>: expected a single document"),
    ("? [a, b]\n: 1\n", "f.yaml:1:3: <root>: mapping keys must be plain scalars"),
])
def test_bad_scalars_and_streams(parser, text, needle):
    _, err = parse_or_error(text)
    assert needle in str(err)


def test_not_text():
    for value in (5, None, [], b"a: 1"):
        with pytest.raises(ConfigError, match="must be YAML text"):
            load_yaml(value, "f.yaml")


# ----------------------------------------------------------------------------- properties
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20))
keys = st.text(st.characters(codec="ascii", categories=("Ll", "Lu", "Nd")), min_size=1, max_size=8)


def nested(depth: int):
    """A value nested exactly ``depth`` collections deep (scalars inside)."""
    if depth == 0:
        return scalars
    inner = nested(depth - 1)
    return st.one_of(st.tuples(inner, scalars).map(list), st.tuples(inner).map(list),
                     st.tuples(keys, inner, scalars).map(lambda t: {t[0]: t[1], t[0] + "_": t[2]}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(depth=st.integers(1, MAX_YAML_DEPTH + 8).flatmap(lambda d: st.tuples(st.just(d), nested(d))),
       flow=st.booleans())
def test_random_nesting_parses_within_the_limit_and_is_refused_beyond(depth, flow):
    d, value = depth
    text = yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True, width=10**6)
    data, err = parse_or_error(text)
    if d <= MAX_YAML_DEPTH:
        assert err is None, err
        assert data == yaml.safe_load(text)
    else:
        assert data is None and "nested deeper than" in str(err) and WHERE.match(str(err))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(levels=st.integers(1, 12), width=st.integers(1, 12), where=st.sampled_from(["flow", "block"]))
def test_random_alias_structures_are_refused_fast(levels, width, where):
    if where == "flow":
        text = alias_bomb(levels + 1, width)
    else:
        text = "base: &b\n  x: 1\n" + "".join(f"k{i}: *b\n" for i in range(width))
    data, err = parse_or_error(text)
    assert data is None and "aliases are not allowed" in str(err) and WHERE.match(str(err))


yaml_chars = st.sampled_from(list("[]{}:,-?&*!|>'\"#%@` \n\tab01.~") + ["\x00", "é", "\ufeff", "---\n", "...\n",
                                                                        "&a ", "*a ", "!!binary ", "<<: "])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(yaml_chars, max_size=200).map("".join))
def test_arbitrary_text_parses_or_raises_config_error(text):
    data, err = parse_or_error(text)
    if err is not None:
        assert str(err).startswith("f.yaml"), str(err)
