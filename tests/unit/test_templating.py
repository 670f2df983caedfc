"""Bounds of template rendering (oao_common/templating.py): every way a template can
build a huge value in one C call is refused before the call, fast, with a permanent
error naming the place; ordinary templates still render."""

from __future__ import annotations

import time

import pytest

from oao_common.errors import PermanentError
from oao_common.templating import render

#: name -> a template that, unbounded, holds the GIL for seconds or allocates gigabytes
#: in one operation (measured before the fix: the first stalled a worker for 13 s).
HOSTILE = {
    "int-power": "{{ ((10**4096)**4096) > 1 }}",
    "int-product": "{{ (2**4000)**200 * (2**4000)**200 > 1 }}",
    "ljust": "{{ 'x'.ljust(200000000) | length }}",
    "center-method": "{{ 'x'.center(300000000) | length }}",
    "zfill": "{{ '1'.zfill(200000000) | length }}",
    "expandtabs": "{{ ('\t' * 1000000).expandtabs(1000) | length }}",
    "replace-method": "{{ ('x' * 1000000).replace('x', 'x' * 200) | length }}",
    "translate": "{{ ('x' * 1000000).translate({120: 'y' * 200}) | length }}",
    "join-method": "{{ 'ab'.join(['x' * 1000000] * 1000) | length }}",
    "format-width": "{{ '{:>200000000}'.format(1) | length }}",
    "format-nested-width": "{{ '{:>{w}}'.format(1, w=200000000) | length }}",
    "percent-width": "{{ '%200000000s' % 'x' | length }}",
    "percent-star": "{{ ('%*s' % (200000000, 'x')) | length }}",
    "list-extend": "{% set l = ['x'] * 1000 %}{% for i in range(60) %}{{ l.extend(l) or '' }}{% endfor %}",
    "join-filter": "{{ (['x' * 1000000] * 200) | join | length }}",
    "replace-filter": "{{ ('x' * 1000000) | replace('x', 'y' * 200) | length }}",
    "center-filter": "{{ 'x' | center(200000000) | length }}",
    "indent-filter": "{{ ('x\n' * 500000) | indent(1000) | length }}",
    "format-filter": "{{ '%200000000s' | format('x') | length }}",
    "wordwrap-filter": "{{ ('x' * 1000000) | wordwrap(1, wrapstring='y' * 1000) | length }}",
    "batch-filter": "{{ range(10) | batch(1000000000, 'x') | list | length }}",
    "slice-filter": "{{ range(10) | slice(1000000000) | list | length }}",
    "sum-filter": "{{ ([['x'] * 1000000] * 1000) | sum(start=[]) | length }}",
    "lipsum": "{{ lipsum(20000) | length }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_huge_value_is_refused_before_it_is_built(name: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(PermanentError) as e:
        render(HOSTILE[name], {}, "nodes.n.task")
    assert time.monotonic() - t0 < 0.5, f"{name}: refused only after {time.monotonic() - t0:.1f} s"
    msg = str(e.value)
    assert msg.startswith("template in nodes.n.task stopped: "), msg
    assert "would exceed" in msg or "lipsum()" in msg, msg


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ 'x'.ljust(4) }}|", "x   |"),
        ("{{ '{:>5}'.format(1) }}", "    1"),
        ("{{ '{:{w}}|'.format('a', w=3) }}", "a  |"),
        ("{{ '%5s|%-3d|' % ('a', 7) }}", "    a|7  |"),
        ("{{ '%s' | format('z') }}", "z"),
        ("{{ ', '.join(['a', 'b']) }} {{ ['a', 'b'] | join('-') }}", "a, b a-b"),
        ("{{ 'a b' | replace(' ', '_') }} {{ 'a-b'.replace('-', '+') }}", "a_b a+b"),
        ("{{ 'ab'.translate({97: 'A'}) }} {{ 'a\tb'.expandtabs(2) }}", "Ab a b"),
        ("{{ 'a\nb' | indent(2) }}", "a\n  b"),
        (
            "{{ range(5) | batch(2) | list }} {{ range(5) | slice(2) | list }}",
            "[[0, 1], [2, 3], [4]] [[0, 1, 2], [3, 4]]",
        ),
        ("{{ [1, 2, 3] | sum }} {{ [[1], [2]] | sum(start=[]) }}", "6 [1, 2]"),
        ("{% set l = [] %}{% for i in range(3) %}{{ l.append(i) or '' }}{% endfor %}{{ l }}", "[0, 1, 2]"),
        ("{{ 2 ** 10 }} {{ 10 ** 100 % 7 }} {{ 'x' * 3 }} {{ 7 % 4 }}", "1024 4 xxx 3"),
        ("{{ (lipsum(2, html=False) | length) > 0 }}", "True"),
    ],
)
def test_ordinary_templates_still_render(template: str, expected: str) -> None:
    assert render(template, {}, "t") == expected
