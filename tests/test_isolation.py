"""IsolatedDecoder: warm worker processes that a crash, hang or memory blow-up cannot take down.

Faults are injected with ``IsolatedDecoder._run_callable``, which runs one of the
module-level generator functions below inside the worker, under the same
supervision as ``decode``.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import time

import numpy as np
import pytest

from tests import media_factory as mf
from xmodal_index.pipeline.decode import (
    DecodeConfig,
    DecoderCrashedError,
    DecodeTimeoutError,
    ProbeError,
    decode_item,
)
from xmodal_index.pipeline.isolation import IsolatedDecoder
from xmodal_index.pipeline.types import MediaItem

# -- run inside the worker ------------------------------------------------------------

def worker_pid():
    yield os.getpid()


def segfault():
    yield "about to crash"
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def hang():
    yield "about to hang"
    time.sleep(3600)


def trickle(interval_s: float):
    while True:
        time.sleep(interval_s)
        yield "still going"


def allocate(gib: int):
    block = np.ones(gib << 30, dtype=np.uint8)  # touches every page
    yield int(block.sum())


def count(n: int):
    yield from range(n)


# ---------------------------------------------------------------------------------------

def item_for(path) -> MediaItem:
    return MediaItem(uri=str(path), kind="video" if str(path).endswith(".mp4") else "audio",
                     size=os.path.getsize(path), mtime=0.0, etag="e")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return mf.make_video(tmp_path_factory.mktemp("iso") / "clip.mp4")


@pytest.fixture
def decoder():
    with IsolatedDecoder(DecodeConfig(idle_timeout_s=5, timeout_s=10, memory_mb=1024)) as dec:
        yield dec


def test_segments_from_the_worker_equal_in_process_decoding(decoder, clip):
    remote = list(decoder.decode(item_for(clip)))
    local = list(decode_item(item_for(clip), DecodeConfig()))
    assert [(s.modality, s.start_s, s.end_s) for s in remote] == [(s.modality, s.start_s, s.end_s) for s in local]
    assert all(np.array_equal(a.payload, b.payload) for a, b in zip(remote, local))


def test_worker_is_reused_across_items(decoder, clip):
    pids = set()
    for _ in range(3):
        assert len(list(decoder.decode(item_for(clip)))) == 4
        pids.update(decoder._run_callable(worker_pid))
    assert len(pids) == 1 and pids != {os.getpid()}
    assert decoder.pids == tuple(pids)


def test_decode_error_in_the_worker_comes_back_as_the_same_class(decoder, tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ProbeError, match="noise.mp4: not a readable media container") as info:
        list(decoder.decode(item_for(path)))
    assert info.value.stage == "probe"
    assert decoder.restarts == 0  # an ordinary bad file does not cost the worker


def test_segfault_costs_one_item_and_the_next_item_decodes(decoder, clip):
    with pytest.raises(DecoderCrashedError, match="killed by signal SIGSEGV"):
        list(decoder._run_callable(segfault, uri="crash.mp4"))
    assert len(list(decoder.decode(item_for(clip)))) == 4
    assert decoder.restarts == 1


def test_hang_is_killed_after_the_idle_timeout(clip):
    with IsolatedDecoder(DecodeConfig(idle_timeout_s=1, timeout_s=30)) as decoder:
        before = list(decoder._run_callable(worker_pid))
        with pytest.raises(DecodeTimeoutError, match="hang.mp4: decoding made no progress for idle_timeout_s=1"):
            list(decoder._run_callable(hang, uri="hang.mp4"))
        assert len(list(decoder.decode(item_for(clip)))) == 4
        assert list(decoder._run_callable(worker_pid)) != before


def test_item_that_keeps_trickling_is_stopped_at_the_total_timeout():
    with IsolatedDecoder(DecodeConfig(idle_timeout_s=5, timeout_s=1.5)) as decoder:
        list(decoder._run_callable(worker_pid))  # a warm worker: start-up time is not the item's
        with pytest.raises(DecodeTimeoutError, match="took over timeout_s=1.5"):
            list(decoder._run_callable(trickle, 0.2, uri="slow.mp4"))


def test_memory_blow_up_is_stopped_by_the_address_space_limit(decoder, clip):
    with pytest.raises(DecoderCrashedError, match="memory_mb=1024"):
        list(decoder._run_callable(allocate, 4, uri="bomb.mp4"))
    assert len(list(decoder.decode(item_for(clip)))) == 4


def test_consumer_stopping_early_leaves_the_worker_clean(decoder):
    stream = decoder._run_callable(count, 100_000)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()
    assert list(decoder._run_callable(count, 3)) == [0, 1, 2]
    assert decoder.restarts == 0


def test_decode_many_keeps_input_order_and_isolates_each_failure(clip, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"")
    wav = mf.make_wav(tmp_path / "tone.wav")
    items = [item_for(clip), item_for(bad), item_for(wav), item_for(clip)]
    results = []
    with IsolatedDecoder(DecodeConfig(workers=2)) as decoder:
        for item, segments in decoder.decode_many(items):
            try:
                results.append((os.path.basename(item.uri), len(list(segments))))
            except ProbeError:
                results.append((os.path.basename(item.uri), "failed"))
        assert len(set(decoder.pids)) == 2
    assert results == [("clip.mp4", 4), ("bad.mp4", "failed"), ("tone.wav", 1), ("clip.mp4", 4)]


def test_pickled_decoder_carries_no_process_and_starts_its_own(decoder, clip):
    list(decoder._run_callable(worker_pid))
    copy = pickle.loads(pickle.dumps(decoder))
    try:
        assert copy.pids == (None,)
        assert len(list(copy.decode(item_for(clip)))) == 4
        assert copy.pids != decoder.pids
    finally:
        copy.close()


def test_close_stops_the_worker(clip):
    decoder = IsolatedDecoder(DecodeConfig())
    list(decoder.decode(item_for(clip)))
    (pid,) = decoder.pids
    decoder.close()
    assert decoder.pids == (None,)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_abandoning_decode_many_midway_leaves_the_workers_reusable(clip):
    items = [item_for(clip)] * 4
    with IsolatedDecoder(DecodeConfig(workers=2)) as decoder:
        for _, segments in decoder.decode_many(items):
            next(segments)
            break
        assert [len(list(s)) for _, s in decoder.decode_many(items)] == [4, 4, 4, 4]
        assert decoder.restarts == 0


# -- native decoder messages ------------------------------------------------------------

def native_chatter(text: str, fail: bool):
    """Writes to file descriptor 2 as FFmpeg's C code does, then yields or fails."""
    os.write(2, text.encode())
    if fail:
        raise ProbeError("fault://chatter: not a readable media container")
    yield "decoded"


def faststart_cut(directory) -> str:
    """An mp4 with its index in front, cut in half: FFmpeg says "partial file" on stderr."""
    whole = mf.make_video(directory / "whole.mp4", duration_s=6.0, faststart=True).read_bytes()
    path = directory / "cut.mp4"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def test_native_messages_of_a_failed_item_go_into_its_error_not_the_console(decoder, capfd):
    chatter = "[h264 @ 0x55d0c0ffee00] Invalid NAL unit size (1234 > 56)\n" * 3 + "threaded_decoder.cc:292: oops\n"
    with pytest.raises(ProbeError) as info:
        list(decoder._run_callable(native_chatter, chatter, True))
    message = str(info.value)
    assert "decoder said: [h264] Invalid NAL unit size (1234 > 56) (x3); threaded_decoder.cc:292: oops" in message
    assert "0x55d0c0ffee00" not in message
    assert capfd.readouterr().err == ""


def test_native_messages_of_a_decoded_item_are_a_debug_line_naming_it(decoder, capfd, caplog):
    with caplog.at_level("DEBUG", logger="xmodal_index.pipeline.isolation"):
        assert list(decoder._run_callable(native_chatter, "[aac @ 0x1] concealing 3 errors\n", False,
                                          uri="/a/clip.mp4")) == ["decoded"]
    assert "/a/clip.mp4: decoder messages: [aac] concealing 3 errors" in caplog.text
    assert capfd.readouterr().err == ""


def test_messages_of_one_item_do_not_follow_the_next(decoder):
    with pytest.raises(ProbeError, match="first item"):
        list(decoder._run_callable(native_chatter, "first item\n", True))
    with pytest.raises(ProbeError) as info:
        list(decoder._run_callable(native_chatter, "second item\n", True))
    assert "first item" not in str(info.value) and "second item" in str(info.value)


def test_a_crashed_workers_native_traceback_goes_into_the_error(decoder, capfd):
    with pytest.raises(DecoderCrashedError, match="SIGSEGV") as info:
        list(decoder._run_callable(segfault))
    assert "Segmentation fault" in str(info.value)
    assert "Segmentation fault" not in capfd.readouterr().err


def test_a_real_cut_file_names_ffmpegs_reason(decoder, tmp_path, capfd):
    path = faststart_cut(tmp_path)
    with pytest.raises(Exception) as info:
        list(decoder.decode(item_for(path)))
    assert "partial file" in str(info.value)
    assert "partial file" not in capfd.readouterr().err
