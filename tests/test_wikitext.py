"""The wikitext cleaner and the MediaWiki dump reader, on hand-written markup with known plain text."""

from __future__ import annotations

import bz2

import pytest

from coalora.data.wikitext import clean_wikitext, read_dump_file

ARTICLE = """{{Infobox person
|name = Ada Example
|birth_date = {{birth date|1815|12|10}}
}}
'''Ada Example''' ({{IPA-en|ˈeɪdə|lang}}; born 1815) was an English [[mathematician]] and [[Writer|writer]].<ref>{{cite book|title=A Life|year=1990}}</ref> She worked on the [[Analytical Engine#Design|engine]]s of [[Charles Babbage]].<ref name="b"/>
<!-- a hidden editor's note -->
[[File:Ada portrait.jpg|thumb|A portrait of [[Ada Example|Ada]] in 1836]]

== Early life ==
Her mother was ''Anne''.<br/>She grew up in [[London]]&nbsp;and [http://example.org Kent].
{| class="wikitable"
|-
! Year !! Event
|-
| 1815 || born {{small|(London)}}
|}
* She studied [[mathematics]].
# She read [[:Category:Poets|poetry]] too.

=== Letters ===
Her letters use the formula <math>E = mc^2</math> rarely. [http://example.org/bare]

== See also ==
* [[Charles Babbage]]

== References ==
{{reflist}}

[[Category:1815 births]]
[[fr:Ada Example]]
__NOTOC__
"""

EXPECTED = """Ada Example (born 1815) was an English mathematician and writer. She worked on the engines of Charles Babbage.

Early life
Her mother was Anne.
She grew up in London and Kent.
She studied mathematics.
She read poetry too.

Letters
Her letters use the formula rarely."""


def test_clean_wikitext_keeps_the_prose_and_drops_every_kind_of_markup():
    assert clean_wikitext(ARTICLE) == EXPECTED


@pytest.mark.parametrize("markup, text", [
    ("a {{outer|x={{inner|y}}|z}} b", "a b"),                       # nested templates go whole
    ("[[File:x.png|thumb|see [[A|a]] and [[B]]]] after", "after"),  # a caption with links goes with its file
    ("[[Page (band)|]] plays", "Page plays"),                       # the pipe trick
    ("[[#Section]] here", "Section here"),
    ("x<ref group=n>note [[A]]</ref>y<ref name=r />z", "xyz"),
    ("'''bold''' and ''italic'' and '''''both'''''", "bold and italic and both"),
    ("{|\n|\n{|\n| inner\n|}\n| outer\n|}\nkept", "kept"),         # nested tables
    ("AT&amp;T &ndash; 5&nbsp;km", "AT&T – 5 km"),
    ("== Notes ==\n* a\n=== Sub ===\n* b\n== History ==\nText.", "History\nText."),
    ("unclosed {{template", "unclosed"),
])
def test_clean_wikitext_cases(markup, text):
    assert clean_wikitext(markup) == text


DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename><base>https://en.wikipedia.org/wiki/Main_Page</base></siteinfo>
  <page><title>Ada Example</title><ns>0</ns><id>7</id>
    <revision><id>1</id><timestamp>2016-01-02T03:04:05Z</timestamp><text xml:space="preserve">'''Ada''' &lt;ref&gt;x&lt;/ref&gt;wrote.</text></revision></page>
  <page><title>AdaExample</title><ns>0</ns><id>8</id><redirect title="Ada Example" />
    <revision><id>2</id><timestamp>2016-01-02T03:04:05Z</timestamp><text>#REDIRECT [[Ada Example]]</text></revision></page>
  <page><title>Wikipedia:About</title><ns>4</ns><id>9</id>
    <revision><id>3</id><timestamp>2016-01-02T03:04:05Z</timestamp><text>Project page.</text></revision></page>
  <page><title>Rock &amp; Roll (song)</title><ns>0</ns><id>10</id>
    <revision><id>4</id><timestamp>2017-05-06T07:08:09Z</timestamp><text>A song.</text></revision></page>
</mediawiki>
"""


def test_read_dump_keeps_main_namespace_articles_with_their_address_and_time(tmp_path):
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(DUMP.encode()))
    base, articles = read_dump_file(path)
    assert base == "https://en.wikipedia.org/wiki/"
    assert [(a.title, a.page_id, a.timestamp) for a in articles] == [
        ("Ada Example", 7, "2016-01-02T03:04:05Z"), ("Rock & Roll (song)", 10, "2017-05-06T07:08:09Z")]
    assert clean_wikitext(articles[0].wikitext) == "Ada wrote."
    assert articles[1].url(base) == "https://en.wikipedia.org/wiki/Rock_%26_Roll_(song)"
