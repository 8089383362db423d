#!/usr/bin/env python3
"""Build the English training corpus for ptqlab's testbed language models.

The text comes from Debian documentation packages only (fetched with
``apt-get download`` and unpacked with ``dpkg -x``):

* python3.11-doc       reStructuredText sources of the Python documentation
* python-django-doc    Django documentation (Sphinx HTML)
* linux-doc-6.1        reStructuredText sources of the Linux kernel documentation
* debian-handbook      The Debian Administrator's Handbook, English HTML
* debian-reference-en  Debian Reference, English HTML
* postgresql-doc-15    PostgreSQL 15 manual (DocBook HTML)
* perl-doc             Perl's POD manual pages
* git-doc              Git's AsciiDoc manual pages and guides
* llvm-14-doc, clang-14-doc, cmake-doc, python-sklearn-doc, python-astropy-doc,
  python-celery-doc, python-pytest-doc, python-flask-doc, sphinx-doc
                       reStructuredText sources of their Sphinx manuals
* python-sqlalchemy-doc, gimp-help-en, apache2-doc, gnucash-docs (English guide
  and help), exim4-doc-html
                       HTML manuals

WikiText and Penn Treebank text are the evaluation sets of ptqlab and are never
used here (the script refuses any source path that mentions them).

Markup is stripped, code blocks, tables, navigation and directives are
dropped, whitespace is normalised, paragraphs are de-duplicated across the
whole corpus, documents (one source file = one document) are shuffled with a
fixed seed and split into train / held-out by document.

Output (in --out):
  corpus_train.txt, corpus_heldout.txt   one paragraph per line, documents
                                          separated by one empty line
  corpus_manifest.json                   packages + versions + .deb sha256,
                                          per-source statistics, output sha256
  debs/                                  the downloaded .deb files (cache)

Usage:
  python scripts/testbed/build_corpus.py --out scripts/testbed/build
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------

SOURCES = [
    {
        "package": "python3.11-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/python3.11/html/_sources/**/*.rst.txt"],
        "exclude": [r"/whatsnew/changelog", r"/_sources/license", r"/_sources/bugs"],
    },
    {
        "package": "python-django-doc",
        "kind": "html",
        "globs": ["usr/share/doc/python-django-doc/html/**/*.html"],
        "exclude": [r"/_modules/", r"/genindex", r"/py-modindex", r"/search\.html", r"/releases/"],
    },
    {
        "package": "linux-doc-6.1",
        "kind": "rst",
        "globs": ["usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt"],
        "exclude": [r"/translations/", r"/_sources/ABI/"],
    },
    {
        "package": "debian-handbook",
        "kind": "html",
        "globs": ["usr/share/doc/debian-handbook/html/en-US/*.html"],
        "exclude": [r"/index\.html$", r"/ix01\.html$"],
    },
    {
        "package": "debian-reference-en",
        "kind": "html",
        "globs": ["usr/share/debian-reference/*.en.html"],
        "exclude": [r"/index\.en\.html$"],
    },
    {
        "package": "postgresql-doc-15",
        "kind": "html",
        "globs": ["usr/share/doc/postgresql-doc-15/html/*.html"],
        "exclude": [r"/bookindex\.html$", r"/release-\d", r"/index\.html$"],
    },
    {
        "package": "perl-doc",
        "kind": "pod",
        "globs": ["usr/share/perl/*/pod/*.pod"],
        "exclude": [r"/perl\d+delta\.pod$", r"/perltoc\.pod$", r"/perlhist\.pod$"],
    },
    {
        "package": "git-doc",
        "kind": "asciidoc",
        "globs": ["usr/share/doc/git-doc/*.txt", "usr/share/doc/git-doc/**/*.txt"],
        "exclude": [r"/RelNotes/"],
    },
    {
        "package": "llvm-14-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/llvm-14-doc/html/_sources/**/*.rst.txt"],
        "exclude": [r"ReleaseNotes", r"/CommandGuide/", r"/tutorial/.*Chapter"],
    },
    {
        "package": "clang-14-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/clang-14/html/_sources/**/*.rst.txt"],
        "exclude": [r"ReleaseNotes", r"AttributeReference", r"DiagnosticsReference", r"ClangFormatStyleOptions"],
    },
    {
        "package": "cmake-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/cmake-data/html/_sources/**/*.rst.txt"],
        "exclude": [r"/release/"],
    },
    {
        "package": "python-sklearn-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/python-sklearn-doc/html/_sources/**/*.rst.txt"],
        "exclude": [r"/auto_examples/", r"/generated/", r"/whats_new", r"/modules/classes\.rst"],
    },
    {
        "package": "python-astropy-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/python-astropy-doc/html/_sources/**/*.rst.txt"],
        "exclude": [r"/api/", r"/generated/", r"/changelog", r"/whatsnew/", r"/credits"],
    },
    {
        "package": "python-celery-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/python-celery-doc/html/_sources/**/*.rst.txt"],
        "exclude": [r"/reference/", r"/internals/reference/", r"/history/", r"/changelog"],
    },
    {
        "package": "python-pytest-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/python-pytest-doc/html/_sources/**/*.rst.txt"],
        "exclude": [r"/changelog", r"/announce/"],
    },
    {
        "package": "python-flask-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/python-flask-doc/html/_sources/**/*.rst.txt"],
        "exclude": [r"/changes"],
    },
    {
        "package": "sphinx-doc",
        "kind": "rst",
        "globs": ["usr/share/doc/sphinx-doc/html/_sources/**/*.rst.txt"],
        "exclude": [r"/changes", r"/_sources/man/"],
    },
    {
        "package": "python-sqlalchemy-doc",
        "kind": "html",
        "globs": ["usr/share/doc/python-sqlalchemy-doc/html/**/*.html"],
        "exclude": [r"/changelog/", r"/genindex", r"/search\.html", r"/_modules/"],
    },
    {
        "package": "gimp-help-en",
        "kind": "html",
        "globs": ["usr/share/gimp/2.0/help/en/*.html"],
        "exclude": [r"/index\.html$"],
    },
    {
        "package": "apache2-doc",
        "kind": "html",
        "globs": ["usr/share/doc/apache2-doc/manual/en/**/*.html", "usr/share/doc/apache2-doc/manual/en/*.html"],
        "exclude": [r"/sitemap\.html$", r"/quickreference\.html$", r"/index\.html$"],
    },
    {
        "package": "gnucash-docs",
        "kind": "html",
        "globs": ["usr/share/doc/gnucash-docs/gnucash-guide-en/*.html", "usr/share/doc/gnucash-docs/gnucash-help-en/*.html"],
        "exclude": [r"/index\.html$"],
    },
    {
        "package": "exim4-doc-html",
        "kind": "html",
        "globs": ["usr/share/doc/exim4-doc-html/spec_html/*.html"],
        "exclude": [r"/index\.html$"],
    },
]

# Sources added for the testbed family (issue 13): processed after SOURCES, de-duplicated against
# them, split on their own (seed + 1) and written to separate files, so that the base corpus -- the
# one the shipped ~7M models were trained on -- stays byte-identical and is a subset of the family's.
DOC = "usr/share/doc"
EXTRA_SOURCES = [
    {"package": "rust-doc", "kind": "html",
     "globs": [f"{DOC}/rust-doc/html/{b}/**/*.html" for b in
               ("book", "reference", "nomicon", "rust-by-example", "edition-guide", "rustc", "embedded-book",
                "rustdoc")],
     "exclude": [r"/print\.html$", r"/404\.html$", r"/toc\.html$"]},
    {"package": "python-pandas-doc", "kind": "rst",
     "globs": [f"{DOC}/python-pandas-doc/html/_sources/**/*.rst.txt"],
     "exclude": [r"/reference/", r"/whatsnew/", r"/generated/"]},
    {"package": "python-sympy-doc", "kind": "rst",
     "globs": [f"{DOC}/python-sympy-doc/html/_sources/**/*.rst.txt"],
     "exclude": [r"/generated/", r"/_sources/(releases|aboutus)"]},
    {"package": "python-scipy-doc", "kind": "html",
     "globs": [f"{DOC}/python-scipy-doc/html/tutorial/**/*.html", f"{DOC}/python-scipy-doc/html/dev/**/*.html",
               f"{DOC}/python-scipy-doc/html/tutorial/*.html"],
     "exclude": [r"/generated/"]},
    {"package": "python-statsmodels-doc", "kind": "rst",
     "globs": [f"{DOC}/python-statsmodels-doc/html/_sources/**/*.rst.txt"],
     "exclude": [r"/generated/", r"/release/"]},
    {"package": "python-dask-doc", "kind": "rst",
     "globs": [f"{DOC}/python-dask-doc/html/_sources/**/*.rst.txt"],
     "exclude": [r"/generated/", r"/changelog"]},
    {"package": "python-xarray-doc", "kind": "rst",
     "globs": [f"{DOC}/python-xarray-doc/html/_sources/**/*.rst.txt"],
     "exclude": [r"/generated/", r"/whats-new"]},
    {"package": "python-tornado-doc", "kind": "rst",
     "globs": [f"{DOC}/python-tornado-doc/html/_sources/**/*.rst.txt"], "exclude": [r"/releases"]},
    {"package": "python-werkzeug-doc", "kind": "rst",
     "globs": [f"{DOC}/python-werkzeug-doc/html/_sources/**/*.rst.txt"], "exclude": [r"/changes"]},
    {"package": "python-setuptools-doc", "kind": "rst",
     "globs": [f"{DOC}/python-setuptools-doc/html/_sources/**/*.rst.txt"], "exclude": [r"/history"]},
    {"package": "python-hypothesis-doc", "kind": "rst",
     "globs": [f"{DOC}/python-hypothesis-doc/html/_sources/**/*.rst.txt"], "exclude": [r"/changes"]},
    {"package": "python-lxml-doc", "kind": "html",
     "globs": [f"{DOC}/python-lxml/html/*.html"], "exclude": [r"/changes", r"/index\.html$"]},
    {"package": "debian-policy", "kind": "rst",
     "globs": [f"{DOC}/debian-policy/policy.html/_sources/*.rst.txt"], "exclude": []},
    {"package": "developers-reference", "kind": "rst",
     "globs": ["usr/share/developers-reference/_sources/*.rst.txt"], "exclude": []},
    {"package": "debmake-doc", "kind": "html",
     "globs": [f"{DOC}/debmake-doc/html/*.en.html"], "exclude": [r"/index\.en\.html$"]},
    {"package": "harden-doc", "kind": "html",
     "globs": [f"{DOC}/harden-doc/html/en-US/*.html"], "exclude": [r"/index\.html$"]},
    {"package": "debian-faq", "kind": "html",
     "globs": [f"{DOC}/debian/FAQ/*.en.html"], "exclude": [r"/index\.en\.html$"]},
    {"package": "maint-guide", "kind": "html",
     "globs": [f"{DOC}/maint-guide/html/*.en.html"], "exclude": [r"/index\.en\.html$"]},
    {"package": "debian-history", "kind": "html",
     "globs": [f"{DOC}/debian-history/docs/*.en.html"], "exclude": [r"/index\.en\.html$"]},
    {"package": "libvirt-doc", "kind": "html",
     "globs": [f"{DOC}/libvirt-doc/html/*.html", f"{DOC}/libvirt-doc/html/kbase/**/*.html",
               f"{DOC}/libvirt-doc/html/manpages/*.html"],
     "exclude": [r"/news\.html$", r"/index\.html$", r"/html/html/"]},
    {"package": "bind9-doc", "kind": "html",
     "globs": [f"{DOC}/bind9-doc/arm/*.html"], "exclude": [r"/genindex", r"/search\.html", r"/notes\.html",
                                                           r"/index\.html$", r"/changelog"]},
    {"package": "nodejs-doc", "kind": "html",
     "globs": [f"{DOC}/nodejs/api/*.html"], "exclude": [r"/all\.html$", r"/index\.html$"]},
    {"package": "octave-doc", "kind": "html",
     "globs": [f"{DOC}/octave/octave.html/*.html"], "exclude": [r"/index\.html$"]},
    {"package": "postfix-doc", "kind": "html",
     "globs": [f"{DOC}/postfix/html/*.html"], "exclude": [r"/index\.html$"]},
    {"package": "gnuplot-doc", "kind": "html",
     "globs": [f"{DOC}/gnuplot/htmldocs/*.html"], "exclude": [r"/index\.html$"]},
    # OpenStack's Sphinx manuals (HTML; API autodoc, module sources and indexes left out)
    *[{"package": f"{pkg}-doc", "kind": "html", "globs": [f"{DOC}/{pkg}-doc/{sub}/**/*.html"],
       "exclude": [r"/_modules/", r"/_sources/", r"/contributor/api/", r"/html/api/", r"/api-ref/", r"/genindex",
                   r"/search\.html$", r"/py-modindex", r"/releasenotes/"]}
      for pkg, sub in (("nova", "html"), ("neutron", "html"), ("keystone", "html"), ("cinder", "html"),
                       ("ironic", "html"), ("glance", "html"), ("heat", "html"), ("swift", "base"))],
    {"package": "erlang-doc", "kind": "html",
     "globs": [f"{DOC}/erlang-doc/**/doc/html/*.html"],
     "exclude": [r"/wx-", r"/src/", r"/index\.html$", r"_app\.html$", r"/notes\.html$", r"release_notes"]},
    {"package": "ghc-doc", "kind": "html",
     "globs": [f"{DOC}/ghc-doc/html/users_guide/**/*.html", f"{DOC}/ghc-doc/html/users_guide/*.html"],
     "exclude": [r"/genindex", r"/search\.html$", r"/\d+\.\d+\.\d+-notes"]},
    {"package": "sqlite3-doc", "kind": "html",
     "globs": [f"{DOC}/sqlite3/*.html", f"{DOC}/sqlite3/**/*.html"],
     "exclude": [r"/releaselog/", r"/syntax/", r"/changes\.html$", r"/chronology\.html$", r"/index\.html$",
                 r"/sitemap\.html$", r"/keyword_index\.html$", r"/toc\.html$"]},
    {"package": "gnome-user-docs", "kind": "html",
     "globs": ["usr/share/help/C/**/*.page"], "exclude": []},
    {"package": "python-biopython-doc", "kind": "html",
     "globs": [f"{DOC}/python-biopython-doc/Doc/Tutorial.html"], "exclude": []},
    {"package": "maxima-doc", "kind": "html",
     "globs": [f"{DOC}/maxima-doc/html/*.html"], "exclude": [r"/index\.html$", r"_toc\.html$", r"Index"]},
    {"package": "grass-doc", "kind": "html",
     "globs": [f"{DOC}/grass-doc/html/*.html"], "exclude": [r"/index\.html$", r"^.*/(full_index|keywords|topics)"]},
    {"package": "kicad-doc-en", "kind": "html",
     "globs": [f"{DOC}/kicad/help/en/**/*.html"], "exclude": []},
]

FORBIDDEN = re.compile(r"wikitext|wiki\.(train|valid|test)|(?<![a-z])ptb(?![a-z])|treebank", re.I)

# ----------------------------------------------------------------------------
# Inline clean-up shared by all formats
# ----------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u00b6", " ").replace("\u200b", "").replace("\ufeff", "")
    return _WS.sub(" ", text).strip()


def keep_paragraph(p: str) -> bool:
    """Drop headings, leftovers of code and other non-prose lines."""
    words = p.split(" ")
    if len(words) < 5 or len(p) < 25:
        return False
    non_space = len(p) - p.count(" ")
    letters = sum(ch.isalpha() for ch in p)
    if letters < 0.6 * non_space:
        return False
    # lines that are mostly code-ish symbols
    if sum(p.count(c) for c in "{}();=<>$[]\\") > 0.08 * len(p):
        return False
    return True


# ----------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------

SKIP_TAGS = {"script", "style", "pre", "table", "head", "nav", "svg", "math", "object", "form",
             "button", "select", "textarea", "noscript", "iframe", "img"}
SKIP_CLASSES = {"highlight", "nav", "navheader", "navfooter", "sphinxsidebar", "sphinxsidebarwrapper",
                "related", "footer", "header", "toc", "docnav", "headerlink", "banner", "breadcrumbs",
                "toctree-wrapper", "index", "indexdiv", "programlisting", "screen", "synopsis",
                "cmdsynopsis", "funcsynopsis", "literallayout", "mediaobject", "figure", "informaltable",
                "table", "refsynopsisdiv", "navigation", "footnotes", "footnote", "legalnotice",
                "producttitle", "titlepage-docnav", "docnav top", "toc-backref", "bookindex",
                "highlight-default", "doctest", "admonition-title", "toplang", "bottomlang", "top", "up",
                "show_sql", "popup_sql", "prev-next", "bottomnav", "topnav"}
SKIP_IDS = {"sidebar", "hd", "ft", "global-nav", "searchbox", "banner", "footer", "header",
            "toc", "navigation", "billboard", "path", "quickview", "page-header", "docs-header",
            "docs-sidebar", "docs-sidebar-popout", "docs-top-navigation-container", "docs-version-header",
            "docs-narrow-top-navigation", "narrow-index-nav", "fixed-sidebar", "docs-bottom-navigation",
            "sidebar-search", "sidebar-banner"}
BLOCK_TAGS = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "br", "blockquote",
              "section", "article", "tr", "ul", "ol", "dl", "title", "hr", "td", "th", "caption",
              "figcaption", "main", "aside", "header", "footer", "body", "html"}
VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "param",
             "source", "track", "wbr"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0

    def _should_skip(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in SKIP_TAGS:
            return True
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if classes & SKIP_CLASSES or any(c.startswith("highlight-") for c in classes):
            return True
        if (a.get("id") or "") in SKIP_IDS:
            return True
        if a.get("role") in {"navigation", "search"}:
            return True
        return False

    def handle_starttag(self, tag, attrs):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        if tag not in VOID_TAGS and self._should_skip(tag, attrs):
            self.skip_tag, self.skip_depth = tag, 1
            self.parts.append("\n\n")
            return
        if tag in BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag, attrs):
        if self.skip_tag is None and tag in BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skip_tag is None:
            self.parts.append(data)


def html_to_paragraphs(raw: str) -> list[str]:
    parser = _TextExtractor()
    parser.feed(raw)
    parser.close()
    text = "".join(parser.parts)
    return [normalise(p) for p in re.split(r"\n\s*\n", text)]


# ----------------------------------------------------------------------------
# reStructuredText
# ----------------------------------------------------------------------------

# directives whose indented body is prose we keep (the directive line itself is dropped)
RST_KEEP = {
    "note", "warning", "seealso", "versionadded", "versionchanged", "deprecated", "deprecated-removed",
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
    "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod", "module",
    "describe", "option", "cmdoption", "envvar", "admonition", "tip", "important", "hint", "attention",
    "caution", "danger", "error", "impl-detail", "opcode", "pdbcommand", "topic", "sidebar", "glossary",
    "c:function", "c:type", "c:macro", "c:member", "c:var", "c:struct", "c:enum", "c:enumerator",
    "c:union", "cpp:function", "cpp:class", "cpp:type", "py:function", "py:class", "py:method",
    "py:attribute", "py:data", "py:exception", "py:module", "audit-event", "availability", "only",
    "rst:directive", "rst:role", "2to3fixer", "epigraph", "container", "compound", "object",
    "awaitablefunction", "awaitablemethod", "index-entry", "highlights", "pull-quote", "rubric",
    "centered", "line-block", "parsed-literal-no",
}
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z0-9_:+-]+)::(.*)$")
_RST_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_RST_ADORN = re.compile(r"^([=\-~^\"'`#*+.:_<>])\1{2,}\s*$")
_RST_SIMPLE_TABLE = re.compile(r"^\s*=+(\s+=+)+\s*$")
_RST_GRID = re.compile(r"^\s*[+|]")
_RST_BULLET = re.compile(r"^(\s*)(?:[-*+\u2022]|#\.|\d+[.)]|\(\d+\)|[a-zA-Z][.)])\s+")
_RST_FIELD = re.compile(r"^(\s*):([^:`]+):(\s+|$)")
_RST_OPTION_LINE = re.compile(r"^\s*:[\w-]+:")


def rst_inline(text: str) -> str:
    # roles :role:`text <target>` / :role:`~a.b` / :role:`!x`
    def role(m: re.Match) -> str:
        inner = m.group(1)
        mm = re.match(r"^(.*?)\s*<[^<>]*>$", inner, re.S)
        if mm and mm.group(1):
            return mm.group(1)
        inner = inner.lstrip("!")
        if inner.startswith("~"):
            inner = inner[1:].split(".")[-1]
        return inner

    text = re.sub(r":[A-Za-z0-9_:+-]+:`([^`]*)`", role, text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`~([\w.]+)`", lambda m: m.group(1).split(".")[-1], text)
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`__?", r"\1", text)
    text = re.sub(r"`([^`]*)`__?", r"\1", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|([^|\s][^|]*)\|(_{0,2})", r"\1", text)
    text = re.sub(r"\[#?[\w-]*\]_", "", text)
    text = re.sub(r"\\(.)", r"\1", text)
    return text


def rst_to_paragraphs(raw: str) -> list[str]:
    lines = raw.expandtabs(8).splitlines()
    paras: list[str] = []
    cur: list[str] = []
    cur_indent = 0
    drop_indent: int | None = None     # drop lines indented deeper than this (literal / dropped directive)
    literal_pending: int | None = None  # paragraph ended with '::' at this indent
    in_table = False
    in_doctest = False
    option_zone = False

    def flush():
        nonlocal cur
        if cur:
            paras.append(rst_inline(" ".join(x.strip() for x in cur)))
        cur = []

    n = len(lines)
    for i, line in enumerate(lines):
        if not line.strip():
            flush()
            in_doctest = False
            if literal_pending is not None:
                drop_indent, literal_pending = literal_pending, None
            continue
        ind = len(line) - len(line.lstrip())
        stripped = line.strip()

        if drop_indent is not None:
            if ind > drop_indent:
                continue
            drop_indent = None
        if literal_pending is not None:
            # text directly following a '::' line without a blank line: treat as literal if indented
            if ind > literal_pending:
                drop_indent, literal_pending = literal_pending, None
                continue
            literal_pending = None
        if in_doctest:
            continue
        if option_zone:
            if _RST_OPTION_LINE.match(line):
                continue
            option_zone = False

        if _RST_SIMPLE_TABLE.match(line):
            flush()
            in_table = not in_table if not (i + 1 < n and lines[i + 1].strip() and in_table) else in_table
            continue
        if in_table:
            continue
        if _RST_GRID.match(line):
            flush()
            continue

        m = _RST_DIRECTIVE.match(line)
        if m:
            flush()
            name = m.group(2).lower()
            if name in RST_KEEP:
                option_zone = True
                arg = m.group(3).strip()
                if name in {"versionadded", "versionchanged", "deprecated"}:
                    rest = arg.split(" ", 1)
                    if len(rest) == 2:
                        cur, cur_indent = [rest[1]], ind
            else:
                drop_indent = ind
            continue
        if _RST_COMMENT.match(line):
            flush()
            drop_indent = ind
            continue

        if _RST_ADORN.match(stripped):
            # section adornment: previous line (if any) is a title, becomes its own paragraph
            flush()
            continue
        if i + 1 < n and _RST_ADORN.match(lines[i + 1].strip()) and len(lines[i + 1].strip()) >= len(stripped) - 2:
            flush()
            paras.append(rst_inline(stripped))
            continue

        if stripped.startswith(">>>"):
            flush()
            in_doctest = True
            continue

        bm = _RST_BULLET.match(line)
        if bm:
            flush()
            cur, cur_indent = [line[bm.end():]], ind
        else:
            fm = _RST_FIELD.match(line)
            if fm:
                flush()
                cur, cur_indent = [line[fm.end():]], ind
            else:
                if not cur:
                    cur_indent = ind
                cur.append(line)

        if stripped.endswith("::"):
            last = cur[-1].rstrip()
            last = last[:-2].rstrip() + ":" if not last.endswith(" ::") else last[:-3].rstrip()
            cur[-1] = last
            if last.strip() in ("", ":"):
                cur.pop()
            literal_pending = cur_indent
            flush()
    flush()
    return [normalise(p) for p in paras]


# ----------------------------------------------------------------------------
# POD
# ----------------------------------------------------------------------------

_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def pod_inline(text: str) -> str:
    def code(letter: str, inner: str) -> str:
        if letter in "XZ":
            return ""
        if letter == "E":
            if inner in _POD_ESCAPES:
                return _POD_ESCAPES[inner]
            if inner.isdigit():
                return chr(int(inner))
            return html.unescape(f"&{inner};")
        if letter == "L":
            if "|" in inner:
                return inner.split("|", 1)[0]
            inner = re.sub(r'^(.*?)/"?(.*?)"?$', lambda m: m.group(2) + (" in " + m.group(1) if m.group(1) else ""), inner)
            return inner
        return inner

    # escapes first, with placeholders for the angle brackets so that the codes around them still parse
    text = re.sub(r"E<([^<>]*)>", lambda m: {"lt": "\ue000", "gt": "\ue001"}.get(m.group(1)) or code("E", m.group(1)), text)
    for _ in range(8):
        new = text
        for k in (4, 3, 2):
            new = re.sub(r"([A-Z])" + "<" * k + r"\s+(.*?)\s+" + ">" * k,
                         lambda m: code(m.group(1), m.group(2)), new, flags=re.S)
        new = re.sub(r"([A-Z])<([^<>]*)>", lambda m: code(m.group(1), m.group(2)), new)
        if new == text:
            break
        text = new
    return text.replace("\ue000", "<").replace("\ue001", ">")


def pod_to_paragraphs(raw: str) -> list[str]:
    blocks = re.split(r"\n\s*\n", raw.expandtabs(8))
    paras: list[str] = []
    in_begin = False
    in_pod = True
    for block in blocks:
        if not block.strip():
            continue
        if block.startswith("="):
            cmd, _, rest = block[1:].partition(" ")
            cmd = cmd.split("\n")[0].strip()
            rest = rest.strip()
            if cmd == "cut":
                in_pod = False
            elif cmd == "pod" or cmd.startswith("head") or cmd == "item":
                in_pod = True
            if cmd == "begin":
                in_begin = True
            elif cmd == "end":
                in_begin = False
            elif cmd.startswith("head") or cmd == "item":
                if cmd == "item":
                    rest = re.sub(r"^(\*|\d+\.?)\s*", "", rest)
                if rest:
                    paras.append(pod_inline(rest))
            continue
        if in_begin or not in_pod:
            continue
        if block[0] in " \t":
            continue  # verbatim paragraph = code
        paras.append(pod_inline(block))
    return [normalise(p) for p in paras]


# ----------------------------------------------------------------------------
# AsciiDoc (git-doc)
# ----------------------------------------------------------------------------

_ADOC_DELIM = re.compile(r"^(-{4,}|\.{4,}|/{4,}|\+{4,}|`{3,}.*)\s*$")
_ADOC_UNDERLINE = re.compile(r"^([=\-~^+])\1{2,}\s*$")


def adoc_inline(text: str) -> str:
    text = re.sub(r"linkgit:([\w.-]+)\[(\d)\]", r"\1(\2)", text)
    text = re.sub(r"link:[^\[\s]*\[([^\]]*)\]", r"\1", text)
    text = re.sub(r"https?://\S+\[([^\]]*)\]", r"\1", text)
    text = re.sub(r"<<[^,>]*,\s*([^>]*)>>", r"\1", text)
    text = re.sub(r"<<([^>]*)>>", r"\1", text)
    text = text.replace("{litdd}", "--").replace("{caret}", "^").replace("{tilde}", "~")
    text = re.sub(r"\{[\w-]+\}", "", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"(?<!\w)'([^'\n]+)'(?!\w)", r"\1", text)
    text = re.sub(r"(?<!\w)_([^_\n]+)_(?!\w)", r"\1", text)
    text = re.sub(r"\*([^*\n]+)\*", r"\1", text)
    text = re.sub(r"\s\+$", "", text)
    return text


def adoc_to_paragraphs(raw: str) -> list[str]:
    lines = raw.expandtabs(8).splitlines()
    paras: list[str] = []
    cur: list[str] = []
    delim: str | None = None
    skip_next_para = False

    def flush():
        nonlocal cur, skip_next_para
        if cur:
            if skip_next_para:
                skip_next_para = False
            else:
                paras.append(adoc_inline(" ".join(x.strip() for x in cur)))
        cur = []

    for i, line in enumerate(lines):
        s = line.rstrip()
        if delim is not None:
            if s.startswith(delim[:4]) and set(s.strip()) == set(delim.strip()):
                delim = None
            continue
        if _ADOC_DELIM.match(s):
            flush()
            delim = s.strip()[:4] if not s.startswith("```") else "```"
            if delim == "```":
                delim = "```"
            continue
        if not s.strip():
            flush()
            continue
        if _ADOC_UNDERLINE.match(s.strip()):
            flush()
            continue
        if i + 1 < len(lines) and _ADOC_UNDERLINE.match(lines[i + 1].strip()) and abs(len(lines[i + 1].strip()) - len(s.strip())) <= 2:
            flush()
            paras.append(adoc_inline(s.strip()))
            continue
        if re.match(r"^:[\w-]+:", s) or re.match(r"^include::", s) or re.match(r"^ifn?def::|^endif::", s):
            continue
        if re.match(r"^\[.*\]$", s.strip()):
            flush()
            if s.strip() in ("[verse]", "[literal]", "[listing]", "[source]") or s.strip().startswith("[source"):
                skip_next_para = True
            continue
        if s[0] in " \t" and not cur:
            # indented literal paragraph
            skip_next_para = True
            cur.append(s)
            continue
        if s.strip() == "+":
            flush()
            continue
        m = re.match(r"^\s*(\*+|-|\d+\.|[a-z]\.)\s+", s)
        if m:
            flush()
            cur.append(s[m.end():])
            continue
        m = re.match(r"^(.*?)(::|;;)\s*$", s)
        if m:
            flush()
            paras.append(adoc_inline(m.group(1)))
            continue
        cur.append(s)
    flush()
    return [normalise(p) for p in paras]


CONVERTERS = {"html": html_to_paragraphs, "rst": rst_to_paragraphs, "pod": pod_to_paragraphs,
              "asciidoc": adoc_to_paragraphs}

# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str], cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    return res.stdout


def fetch_deb(package: str, version: str | None, debs_dir: Path) -> Path:
    existing = sorted(debs_dir.glob(f"{package}_*.deb"))
    if version is not None:
        existing = [p for p in existing if run(["dpkg-deb", "-f", str(p), "Version"]).strip() == version]
    if existing:
        return existing[-1]
    spec = f"{package}={version}" if version else package
    # apt drops privileges to _apt for downloads; give it a writable directory
    tmp = Path(tempfile.mkdtemp(prefix="aptdl-"))
    os.chmod(tmp, 0o777)
    try:
        if subprocess.run(["apt-get", "download", spec], cwd=tmp).returncode != 0:
            if version is None:
                raise RuntimeError(f"apt-get download {spec} failed")
            # the archive keeps only the newest security or point release: take it, say so, and let the
            # manifest record the version used (the text may differ from the pinned build's)
            print(f"WARNING: {spec} is no longer in the archive; using its current version", flush=True)
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
        got = sorted(tmp.glob(f"{package}_*.deb"))
        if not got:
            raise RuntimeError(f"apt-get download {spec} produced no .deb")
        dest = debs_dir / got[-1].name
        shutil.move(str(got[-1]), dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def collect_source(src: dict, pins: dict[str, str], debs_dir: Path, tmp: Path, seen: set[bytes],
                   documents: list[dict], manifest_packages: list[dict], min_doc_chars: int) -> None:
    """Fetch one package, convert its matching files to paragraphs and append its documents.

    Paragraphs already in ``seen`` (case-insensitive, any earlier source or file) are dropped.
    """
    pkg = src["package"]
    deb = fetch_deb(pkg, pins.get(pkg), debs_dir)
    version = run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    root = tmp / pkg
    root.mkdir()
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    files: set[Path] = set()
    for g in src["globs"]:
        files.update(Path(p) for p in glob.glob(str(root / g), recursive=True))
    excl = [re.compile(e) for e in src["exclude"]]
    files = sorted(f for f in files if f.is_file() and not any(e.search(str(f)) for e in excl))
    convert = CONVERTERS[src["kind"]]
    n_docs = n_paras = n_bytes = n_dup = 0
    for f in files:
        rel = str(f.relative_to(root))
        if FORBIDDEN.search(rel):
            raise RuntimeError(f"refusing evaluation-set-like source {rel}")
        raw = f.read_text(encoding="utf-8", errors="replace")
        paras = []
        for p in convert(raw):
            if not keep_paragraph(p):
                continue
            key = hashlib.blake2b(p.lower().encode(), digest_size=16).digest()
            if key in seen:
                n_dup += 1
                continue
            seen.add(key)
            paras.append(p)
        text_len = sum(len(p) + 1 for p in paras)
        if text_len < min_doc_chars:
            continue
        documents.append({"source": pkg, "path": rel, "paras": paras})
        n_docs += 1
        n_paras += len(paras)
        n_bytes += sum(len(p.encode()) + 1 for p in paras)
    info = {"package": pkg, "version": version, "deb": deb.name, "deb_sha256": sha256_file(deb),
            "format": src["kind"], "globs": src["globs"], "exclude": src["exclude"],
            "files_matched": len(files), "documents": n_docs, "paragraphs": n_paras,
            "duplicate_paragraphs_dropped": n_dup, "text_bytes": n_bytes}
    manifest_packages.append(info)
    print(f"{pkg:22s} {version:28s} files={len(files):5d} docs={n_docs:5d} "
          f"paras={n_paras:7d} bytes={n_bytes:10d} dups={n_dup}", flush=True)
    shutil.rmtree(root, ignore_errors=True)   # unpacked docs can be hundreds of MB


def write_split(out: Path, train: list[dict], held: list[dict], names: tuple[str, str],
                sources: list[dict]) -> dict:
    """Write train / held-out documents (one paragraph per line, documents separated by an empty line)."""
    outputs = {}
    for name, docs in zip(names, (train, held)):
        path = out / name
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n\n".join("\n".join(d["paras"]) for d in docs))
            f.write("\n")
        outputs[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "documents": len(docs),
                         "paragraphs": sum(len(d["paras"]) for d in docs),
                         "by_source": {s["package"]: sum(1 for d in docs if d["source"] == s["package"])
                                       for s in sources}}
        print(f"wrote {path}: {outputs[name]['bytes']} bytes, {len(docs)} documents", flush=True)
    return outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("scripts/testbed/build"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--heldout-fraction", type=float, default=0.02)
    ap.add_argument("--min-doc-chars", type=int, default=300)
    ap.add_argument("--pin", type=Path, default=None,
                    help="a previous corpus_manifest.json: fetch exactly the package versions it names")
    ap.add_argument("--no-update", action="store_true", help="skip 'apt-get update'")
    ap.add_argument("--family", action="store_true",
                    help="also build the family's extra corpus (EXTRA_SOURCES) into corpus_extra_*.txt")
    args = ap.parse_args(argv)

    out: Path = args.out
    debs_dir = out / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)

    pins: dict[str, str] = {}
    if args.pin:
        pinned = json.loads(args.pin.read_text())
        # a family manifest pins its extra packages too
        pins = {p["package"]: p["version"] for p in pinned["packages"] + pinned.get("extra_packages", [])
                if isinstance(p, dict)}  # a family manifest lists the extra packages by name only

    all_sources = SOURCES + (EXTRA_SOURCES if args.family else [])
    need_download = any(not list(debs_dir.glob(f"{s['package']}_*.deb")) for s in all_sources)
    if need_download and not args.no_update:
        print("apt-get update ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)

    documents: list[dict] = []   # {"source","path","paras"}
    manifest_packages: list[dict] = []
    seen: set[bytes] = set()
    extra_documents: list[dict] = []
    extra_packages: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="testbed-corpus-") as tmpd:
        tmp = Path(tmpd)
        for src in SOURCES:
            collect_source(src, pins, debs_dir, tmp, seen, documents, manifest_packages, args.min_doc_chars)
        if args.family:
            # after the base sources, so that the base corpus is unchanged and new text that repeats
            # a base paragraph is dropped
            for src in EXTRA_SOURCES:
                collect_source(src, pins, debs_dir, tmp, seen, extra_documents, extra_packages,
                               args.min_doc_chars)

    rng = random.Random(args.seed)
    rng.shuffle(documents)
    n_held = max(1, round(len(documents) * args.heldout_fraction))
    held, train = documents[:n_held], documents[n_held:]

    outputs = write_split(out, train, held, ("corpus_train.txt", "corpus_heldout.txt"), SOURCES)
    (out / "heldout_documents.txt").write_text("".join(f"{d['source']}\t{d['path']}\n" for d in held))

    manifest = {
        "description": "ptqlab testbed LM corpus: English prose from Debian documentation packages "
                       "(no WikiText / Penn Treebank text)",
        "recipe": "python scripts/testbed/build_corpus.py --out scripts/testbed/build",
        "seed": args.seed, "heldout_fraction": args.heldout_fraction, "min_doc_chars": args.min_doc_chars,
        "format": "one paragraph per line; documents separated by one empty line",
        "packages": manifest_packages, "outputs": outputs,
    }
    (out / "corpus_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out / 'corpus_manifest.json'}")
    if args.family:
        rng = random.Random(args.seed + 1)
        rng.shuffle(extra_documents)
        n_held = max(1, round(len(extra_documents) * args.heldout_fraction))
        x_held, x_train = extra_documents[:n_held], extra_documents[n_held:]
        x_outputs = write_split(out, x_train, x_held, ("corpus_extra_train.txt", "corpus_extra_heldout.txt"),
                                EXTRA_SOURCES)
        (out / "extra_heldout_documents.txt").write_text(
            "".join(f"{d['source']}\t{d['path']}\n" for d in x_held))
        family = {
            "description": "ptqlab testbed family corpus: the base corpus (corpus_manifest.json, unchanged) "
                           "plus more Debian documentation packages, de-duplicated against the base and "
                           "split on their own; family train = base train + extra train, family held-out = "
                           "base held-out + extra held-out",
            "recipe": "python scripts/testbed/build_corpus.py --out scripts/testbed/build --family",
            "seed": args.seed + 1, "heldout_fraction": args.heldout_fraction,
            "min_doc_chars": args.min_doc_chars, "base_outputs": outputs,
            "packages": manifest_packages + extra_packages, "extra_packages": [p["package"] for p in extra_packages],
            "outputs": x_outputs,
        }
        (out / "corpus_family_manifest.json").write_text(json.dumps(family, indent=2) + "\n")
        print(f"wrote {out / 'corpus_family_manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
