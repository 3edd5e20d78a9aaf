"""The vader preprocessor: a small tarball in the real layout, then the real sdist from PyPI."""

import io
import tarfile
from fractions import Fraction

import pytest

from data_prep import load_splits
from data_prep import drops as R
from data_prep import vader
from data_prep.normalize import heldout_by_hash
from dpo_zoo.config import DataConfig
from dpo_zoo.errors import DataError

# source prefix -> rows of (id, ratings, text); the means are what the pairs are built from.
SMALL = {
    "movieReviewSnippets": [
        ("1", [4, 3, 4, 3], "A triumph of a film."),  # mean 3.5
        ("2", [-3, -4, -2, -3], "Dull and far too long."),  # mean -3
        ("3", [1, 1, 1, 1], "Watchable."),  # mean 1
        ("4", [1, 1, 1, 0], "Mostly watchable."),  # mean 0.75: a tie with 3 at the 0.25 threshold
        ("5", [0, 0, 1, -1], "It is a movie."),  # mean 0
        ("6", [2, 2, 3, 1], "Charming and warm."),  # mean 2
    ],
    "amazonReviewSnippets": [("1_1", [2, 3, 2, 3], "great player."), ("1_2", [-2, -2, -1, -3], "it broke."), ("1_3", [0, 0, 0, 1], "it came in a box.")],
    "nytEditorialSnippets": [("1_1", [0, 1, 0, 0], "The council met."), ("1_2", [-2, -1, -2, -2], "The plan is a disgrace."), ("1_3", [1, 2, 1, 2], "A fine idea.")],
    "tweets": [("1", [3, 3, 4, 2], "best day ever :)"), ("2", [-2, -3, -2, -2], "ugh, rain again"), ("3", [0, 0, 0, 0], "at the bus stop")],
}


def _files(data=SMALL, ground_truth_mean=None):
    """{file name: bytes} in the real layout: tab-separated, CRLF lines, no newline at the end."""
    out = {}
    for prefix, rows in data.items():
        truth, ratings = [], []
        for snippet_id, values, text in rows:
            mean = sum(values) / len(values)
            shown = ground_truth_mean(snippet_id, mean) if ground_truth_mean else mean
            truth.append(f"{snippet_id}\t{shown}\t{text}")
            ratings.append(f"{snippet_id}\t{mean}\t0.5\t{values}")
        out[f"{prefix}_GroundTruth.txt"] = "\r\n".join(truth).encode()
        out[f"{prefix}_anonDataRatings.txt"] = "\r\n".join(ratings).encode()
    return out


def _tar(members, mode="w:gz"):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _hutto(tmp_path, files=None):
    path = tmp_path / "hutto_ICWSM_2014.tar.gz"
    path.write_bytes(_tar({f"hutto_ICWSM_2014/{k}": v for k, v in (files or _files()).items()}))
    return path


def _sdist(tmp_path, files=None):
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    inner = _hutto(tmp_path, files).read_bytes()
    path.write_bytes(_tar({"vaderSentiment-3.3.2/setup.py": b"", "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    return path


def cfg(path, fraction=0.0, **kw):
    return DataConfig(preprocessor="vader", train_path=str(path), heldout_fraction=fraction, **kw)


def test_soft_label_worked_by_hand():
    """chosen [2, 1] vs rejected [1, 0]: of the 4 rating pairs, (2,1) (2,0) (1,0) are wins and (1,1) a
    tie, so P = (3 + 0.5) / 4 = 0.875. Identical distributions give 0.5; swapping sides gives 1 − P."""
    assert vader.soft_label([2, 1], [1, 0]) == 0.875
    assert vader.soft_label([1, 0], [2, 1]) == 0.125
    assert vader.soft_label([3, -1, 0], [3, -1, 0]) == 0.5
    assert vader.soft_label([4, 4], [-4]) == 1.0


def test_pairs_ties_prompts_and_soft_labels(tmp_path):
    loaded = load_splits(cfg(_sdist(tmp_path)))
    means = {(p, i): Fraction(sum(v), len(v)) for p, rows in SMALL.items() for i, v, _ in rows}
    prefix = {key: value[0] for key, value in vader.SOURCES.items()}
    assert loaded.heldout == []
    # pairs_per_snippet=1: at most one pair started from each snippet (fewer when all of a snippet's
    # partners already paired with it, as in a 3-snippet source), every snippet in some pair.
    assert len(loaded.train) <= 6 + 3 + 3 + 3
    unordered = {frozenset((p.extra["source"] + p.extra["chosen_snippet"], p.extra["source"] + p.extra["rejected_snippet"])) for p in loaded.train}
    assert len(unordered) == len(loaded.train) == len({p.id for p in loaded.train})
    assert set().union(*unordered) == {vader_key + i for vader_key, (pre, _) in vader.SOURCES.items() for i, _, _ in SMALL[pre]}
    for pair in loaded.train:
        source = pair.extra["source"]
        chosen_mean = means[(prefix[source], pair.extra["chosen_snippet"])]
        rejected_mean = means[(prefix[source], pair.extra["rejected_snippet"])]
        assert chosen_mean >= rejected_mean
        assert pair.is_tie == (chosen_mean - rejected_mean <= Fraction(1, 4))
        assert pair.prompt == [{"role": "user", "content": vader.SOURCES[source][1]}]
        assert pair.chosen[0]["role"] == pair.rejected[0]["role"] == "assistant"
        assert 0.0 <= pair.soft_label <= 1.0
        assert pair.extra["chosen_mean"] == float(chosen_mean)
    texts = {text: (i, values) for rows in SMALL.values() for i, values, text in rows}
    for pair in loaded.train:
        chosen_values, rejected_values = texts[pair.chosen[0]["content"]][1], texts[pair.rejected[0]["content"]][1]
        assert pair.soft_label == vader.soft_label(chosen_values, rejected_values)
    stats = loaded.stats["sources"]
    assert {s: stats[s]["snippets"] for s in stats} == {"movie": 6, "amazon": 3, "nyt": 3, "tweets": 3}
    assert loaded.stats["train_ties"] == sum(p.is_tie for p in loaded.train)
    assert loaded.drops.total == 0 and sum(loaded.drops.rows_read.values()) == 15


def test_tie_threshold_is_inclusive_and_exact(tmp_path):
    """Means 1 and 0.75 differ by exactly 0.25 (both, and their difference, are exact in binary
    floating point, so the comparison has no rounding to hide behind): a tie at threshold 0.25 (the
    threshold is inclusive), not at 0.24; threshold 0 makes only equal means ties."""
    only = {"movieReviewSnippets": SMALL["movieReviewSnippets"][2:4]}
    path = tmp_path / "folder"
    path.mkdir()
    for name, data in _files(only).items():
        (path / name).write_bytes(data)
    for threshold, tie in ((0.25, True), (0.24, False), (0, False)):
        loaded = load_splits(cfg(path, options={"sources": ["movie"], "tie_threshold": threshold}))
        assert [p.is_tie for p in loaded.train] == [tie]
        assert loaded.train[0].chosen[0]["content"] == "Watchable."


def test_split_is_by_snippet(tmp_path):
    many = {"movieReviewSnippets": [(str(i), [i % 9 - 4, (i * 7) % 9 - 4, 0], f"snippet number {i}") for i in range(200)]}
    path = tmp_path / "folder"
    path.mkdir()
    for name, data in _files(many).items():
        (path / name).write_bytes(data)
    loaded = load_splits(cfg(path, fraction=0.3, options={"sources": ["movie"], "pairs_per_snippet": 3}))
    train_snippets = {s for p in loaded.train for s in (p.extra["chosen_snippet"], p.extra["rejected_snippet"])}
    heldout_snippets = {s for p in loaded.heldout for s in (p.extra["chosen_snippet"], p.extra["rejected_snippet"])}
    assert train_snippets and heldout_snippets and not train_snippets & heldout_snippets
    assert all(heldout_by_hash(f"movie:{s}", 0.3) for s in heldout_snippets)
    assert not any(heldout_by_hash(f"movie:{s}", 0.3) for s in train_snippets)
    stats = loaded.stats["sources"]["movie"]
    assert stats["train_snippets"] + stats["heldout_snippets"] == 200
    assert stats["train_pairs"] == 3 * stats["train_snippets"]  # no unordered pair made twice
    pairs = {frozenset((p.extra["chosen_snippet"], p.extra["rejected_snippet"])) for p in loaded.train}
    assert len(pairs) == len(loaded.train)


def test_pairing_is_seeded_and_deterministic(tmp_path):
    path = _sdist(tmp_path)
    first, again = load_splits(cfg(path)), load_splits(cfg(path))
    assert [p.id for p in first.train] == [p.id for p in again.train] and first.fingerprint == again.fingerprint
    other = load_splits(cfg(path, options={"seed": 1}))
    assert other.fingerprint != first.fingerprint


def test_sdist_inner_tarball_and_folder_read_the_same(tmp_path):
    from_sdist = load_splits(cfg(_sdist(tmp_path)))
    from_tarball = load_splits(cfg(_hutto(tmp_path)))
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in _files().items():
        (folder / name).write_bytes(data)
    from_folder = load_splits(cfg(folder))
    assert from_sdist.fingerprint == from_tarball.fingerprint == from_folder.fingerprint
    assert from_sdist.sources == [str(tmp_path / "vaderSentiment-3.3.2.tar.gz")]
    assert from_sdist.train[0].source_file.startswith(str(tmp_path / "vaderSentiment-3.3.2.tar.gz") + "!")


def test_identical_texts_become_one_snippet_with_pooled_ratings(tmp_path):
    rows = {"tweets": [("1", [2, 2], "same text"), ("2", [-1, -1], "other"), ("3", [4, 4], "same text"), ("4", [0, 1], "third")]}
    loaded = load_splits(cfg(_hutto(tmp_path, _files(rows)), options={"sources": ["tweets"], "pairs_per_snippet": 2}))
    assert loaded.stats["sources"]["tweets"]["snippets"] == 3
    assert loaded.stats["sources"]["tweets"]["duplicate_texts_merged"] == 1
    pooled = [p for p in loaded.train if p.extra["chosen_snippet"] == "1" or p.extra["rejected_snippet"] == "1"]
    assert pooled and all(p.extra.get("chosen_raters", 0) == 4 for p in pooled if p.extra["chosen_snippet"] == "1")
    assert all(p.chosen != p.rejected for p in loaded.train)
    assert "vader tweets: identical texts merged into one snippet (ratings pooled)" in loaded.drops.notes


def test_ground_truth_mean_disagreement_is_noted_and_raw_ratings_win(tmp_path):
    files = _files({"tweets": SMALL["tweets"]}, ground_truth_mean=lambda i, m: m + 1 if i == "2" else m)
    loaded = load_splits(cfg(_hutto(tmp_path, files), options={"sources": ["tweets"]}))
    assert loaded.stats["sources"]["tweets"]["groundtruth_mean_differs"] == 1
    means = {p.extra["rejected_snippet"]: p.extra["rejected_mean"] for p in loaded.train}
    means.update({p.extra["chosen_snippet"]: p.extra["chosen_mean"] for p in loaded.train})
    assert means["2"] == -2.25


def test_bad_lines_are_named_or_counted(tmp_path):
    files = _files({"tweets": SMALL["tweets"]})
    files["tweets_GroundTruth.txt"] += b"\r\n9\t0.5\tno ratings for me\r\nbroken line\r\n4\t0\t\xff\xfe"
    files["tweets_anonDataRatings.txt"] += b"\r\n4\t0\t0\t[0, 0]\r\n5\t9\t0\t[9, 9]\r\n6\t0\t0\t[0, 0]"
    path = _hutto(tmp_path, files)
    with pytest.raises(DataError, match=r"tweets_anonDataRatings.txt, row 4 \(0-based\), field 'RATINGS': bad value: expected a list of at least 2 integer ratings in -4..4"):
        load_splits(cfg(path, options={"sources": ["tweets"]}))
    loaded = load_splits(cfg(path, on_bad_row="skip", options={"sources": ["tweets"]}))
    assert loaded.drops.counts == {R.UNMATCHED_SNIPPET: 3, R.BAD_VALUE: 1, R.MALFORMED_LINE: 1, R.UNDECODABLE: 1}
    where = {(d["file"].rsplit("/", 1)[-1], d["row"], d["reason"]) for d in loaded.drops.rows}
    assert where == {
        ("tweets_anonDataRatings.txt", 4, R.BAD_VALUE),
        ("tweets_GroundTruth.txt", 3, R.UNMATCHED_SNIPPET),
        ("tweets_GroundTruth.txt", 4, R.MALFORMED_LINE),
        ("tweets_GroundTruth.txt", 5, R.UNDECODABLE),
        ("tweets_anonDataRatings.txt", 3, R.UNMATCHED_SNIPPET),  # rated, but its text line was undecodable
        ("tweets_anonDataRatings.txt", 5, R.UNMATCHED_SNIPPET),  # rated, no text at all
    }
    assert loaded.stats["sources"]["tweets"]["snippets"] == 3


def test_plain_text_form(tmp_path):
    pair = load_splits(cfg(_sdist(tmp_path), options={"as_messages": False, "sources": ["movie"]})).train[0]
    assert pair.prompt == "Write a movie review sentence with positive sentiment.\n"
    assert isinstance(pair.chosen, str) and isinstance(pair.rejected, str)


def test_options_and_settings_are_checked(tmp_path):
    path = _sdist(tmp_path)
    for options, message in (
        ({"tie_threshold": -1}, "tie_threshold`: expected a number >= 0"),
        ({"pairs_per_snippet": 0}, "pairs_per_snippet`: expected an integer >= 1"),
        ({"sources": ["imdb"]}, "sources`: expected a non-empty list of movie, amazon, nyt, tweets"),
        ({"seed": "x"}, "seed`: expected an integer"),
        ({"tie": 1}, r"`data.options.tie`: not an option of the vader preprocessor"),
    ):
        with pytest.raises(DataError, match=message):
            load_splits(cfg(path, options=options))
    with pytest.raises(DataError, match="heldout_path"):
        load_splits(cfg(path, heldout_path=str(path)))
    with pytest.raises(DataError, match="data.columns"):
        load_splits(cfg(path, columns={"chosen": "x"}))
    not_a_tarball = tmp_path / "ratings.txt"
    not_a_tarball.write_text("1\t0.5\thello")
    with pytest.raises(DataError, match="ratings.txt: not a readable tarball"):
        load_splits(cfg(not_a_tarball))
    not_vader = tmp_path / "other.tar.gz"
    not_vader.write_bytes(_tar({"x/readme.txt": b"hi"}))
    with pytest.raises(DataError, match="movieReviewSnippets_GroundTruth.txt, movieReviewSnippets_anonDataRatings.txt not found"):
        load_splits(cfg(not_vader))


# ----------------------------------------------------------------------------- fetching


def test_fetch_downloads_once_checks_the_hash_and_reuses(tmp_path, monkeypatch):
    payload = b"pretend sdist"
    calls = []

    def fake_pip(directory):
        calls.append(directory)
        (directory / vader.SDIST_NAME).write_bytes(payload)
        return vader.subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(vader, "_pip_download", fake_pip)
    monkeypatch.setattr(vader, "SDIST_SHA256", vader.hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("DPO_ZOO_CACHE", str(tmp_path / "cache"))
    first = vader.fetch_sdist()
    assert first == tmp_path / "cache" / "data" / vader.SDIST_NAME and first.read_bytes() == payload
    assert vader.fetch_sdist() == first and len(calls) == 1  # reused, not downloaded again
    first.write_bytes(b"damaged")
    assert vader.fetch_sdist().read_bytes() == payload and len(calls) == 2  # a damaged copy is replaced
    assert sorted(p.name for p in first.parent.iterdir()) == [vader.SDIST_NAME]  # no download leftovers


def test_fetch_failures_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(vader, "_pip_download", lambda d: vader.subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution"))
    with pytest.raises(DataError, match="could not download vaderSentiment==3.3.2 .* No matching distribution"):
        vader.fetch_sdist(tmp_path)

    def wrong_file(directory):
        (directory / vader.SDIST_NAME).write_bytes(b"tampered")
        return vader.subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(vader, "_pip_download", wrong_file)
    with pytest.raises(DataError, match="has sha256 .* expected 5d7c06e0"):
        vader.fetch_sdist(tmp_path)
    assert not (tmp_path / vader.SDIST_NAME).exists()


# ----------------------------------------------------------------------------- the real data


@pytest.fixture(scope="session")
def real_sdist():
    """The real sdist, fetched from PyPI into the dpo_zoo cache once and reused."""
    try:
        return vader.fetch_sdist()
    except DataError as err:  # no network to PyPI: the synthetic tests above still cover the logic
        pytest.skip(f"vaderSentiment sdist not available: {err}")


def test_real_vader_counts(real_sdist):
    """23,703 rated snippets; 84 repeated texts are merged (amazon 11, movie 2, nyt 71), leaving 23,619;
    the tweets' ground-truth file disagrees with their raw ratings for 199 snippets."""
    loaded = load_splits(DataConfig(preprocessor="vader", train_path=str(real_sdist)))
    assert loaded.drops.total == 0 and sum(loaded.drops.rows_read.values()) == 23703
    stats = loaded.stats["sources"]
    assert {s: v["rows"] for s, v in stats.items()} == {"movie": 10605, "amazon": 3708, "nyt": 5190, "tweets": 4200}
    assert {s: v["snippets"] for s, v in stats.items()} == {"movie": 10603, "amazon": 3697, "nyt": 5119, "tweets": 4200}
    assert {s: v["duplicate_texts_merged"] for s, v in stats.items()} == {"movie": 2, "amazon": 11, "nyt": 71, "tweets": 0}
    assert stats["tweets"]["groundtruth_mean_differs"] == 199
    assert {s: (v["train_snippets"], v["heldout_snippets"]) for s, v in stats.items()} == {
        "movie": (9593, 1010), "amazon": (3300, 397), "nyt": (4637, 482), "tweets": (3763, 437),
    }
    assert (len(loaded.train), len(loaded.heldout)) == (21293, 2326)
    assert (loaded.stats["train_ties"], loaded.stats["heldout_ties"]) == (2525, 259)
    train_snippets = {(p.extra["source"], s) for p in loaded.train for s in (p.extra["chosen_snippet"], p.extra["rejected_snippet"])}
    heldout_snippets = {(p.extra["source"], s) for p in loaded.heldout for s in (p.extra["chosen_snippet"], p.extra["rejected_snippet"])}
    assert not train_snippets & heldout_snippets
    non_ties = [p.soft_label for p in loaded.train if not p.is_tie]
    assert sum(non_ties) / len(non_ties) > 0.8  # the raters mostly agree on which of a non-tied pair is more positive
