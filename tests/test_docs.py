"""The README stays a front door (short), and no link in it or in docs/ leads nowhere."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_at_most_150_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall((REPO / "README.md").read_text())}
    assert not [p.name for p in PAGES[1:] if p not in linked]


COMMAND = re.compile(r"(?:^|`)(snakemake(?: [^`\n#]*)?)", flags=re.M)


def test_every_snakemake_command_in_the_docs_runs_as_written():
    """Each `snakemake ...` of the README and docs/ parses with Snakemake's own parser as meant:
    every word after --configfile is a config file that exists (a target there would be read as one),
    and a command that runs jobs names --cores or a profile (Snakemake refuses to start without
    one: the README's `snakemake --rerun-incomplete` after a crash once did)."""
    import shlex

    import yaml
    from snakemake.cli import get_argument_parser

    assert "cores" not in yaml.safe_load((REPO / "workflow/profiles/default/config.yaml").read_text())
    commands = [c.strip() for page in PAGES for c in COMMAND.findall(page.read_text())]
    assert len(commands) > 10, commands
    wrong = []
    for command in commands:
        args = get_argument_parser().parse_args(shlex.split(command)[1:])
        runs_jobs = not (args.dryrun or args.report or args.unlock or args.lint or args.profile)
        if runs_jobs and args.cores is None and args.jobs is None:
            wrong.append(f"{command}: no --cores (Snakemake refuses to start)")
        for path in map(str, args.configfile or []):
            if "<" in path or path.startswith(("OUT/", "DIR/")):
                continue  # a placeholder the text explains
            if not path.endswith((".yaml", ".yml", ".json")) or not ((REPO / path).is_file() or path.startswith("resources/")):
                wrong.append(f"{command}: {path!r} is read as a config file")
    assert not wrong, wrong
