"""What a surviving process says when a peer is lost (dpo_zoo.parallel.peers), without starting any process."""

from pathlib import Path

from dpo_zoo.parallel import peers


def test_lost_rank_is_read_from_the_peer_address_in_the_backend_message(monkeypatch):
    monkeypatch.setattr(peers, "_ADDRESSES", {0: "10.77.0.1", 1: "10.77.0.2", 2: "10.77.0.2", 3: "10.77.0.3"})
    gloo = "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.77.0.2]:47122"
    assert peers.lost_ranks(gloo, own_rank=0, world_size=4) == [1, 2]  # both ranks of that node
    # A timeout names no peer: every other rank is a suspect.
    assert peers.lost_ranks("Timed out waiting 60000ms for recv operation to complete", 3, 4) == [0, 1, 2]


def test_last_checkpoint_is_the_latest_tag_or_none(tmp_path: Path):
    assert peers.last_checkpoint(tmp_path).startswith(f"none in {tmp_path}")
    (tmp_path / "latest").write_text("step-0000004")
    assert peers.last_checkpoint(tmp_path).startswith(f"{tmp_path / 'step-0000004'} (step 4)")


def test_only_a_failed_collective_is_translated():
    import pytest

    with pytest.raises(ValueError, match="not a peer"):  # no process group here: re-raised untouched
        with peers.lost_peer_as_error(Path("unused")):
            raise ValueError("not a peer")
