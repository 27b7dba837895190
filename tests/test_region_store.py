"""The region-embedding store: round trip, pickling for workers, integrity errors, resumable writing, merging."""

import json
import pickle

import numpy as np
import pytest

from ovd.data.region_store import RegionStore, RegionStoreWriter, merge_stores

DIM = 8
JOB = {"model_name": "toy", "pretrained": None, "dim": DIM, "top_k": 3}


def fake_chunk(image_ids, counts, seed):
    rng = np.random.default_rng(seed)
    total = int(sum(counts))
    embeds = rng.standard_normal((total, DIM)).astype(np.float32)
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    boxes = rng.uniform(0, 50, (total, 4)).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    return {"image_ids": np.array(image_ids), "counts": np.array(counts), "boxes": boxes, "embeds": embeds}


# Two chunks: images 1, 2, 5 (image 2 with no regions), then 8, 9.
CHUNKS = [fake_chunk([1, 2, 5], [3, 0, 2], 0), fake_chunk([8, 9], [1, 3], 1)]


def write_store(path, chunks=CHUNKS, job=JOB, chunk_ids=None):
    chunk_ids = list(range(len(chunks))) if chunk_ids is None else chunk_ids
    writer = RegionStoreWriter(path, job=job)
    for k, chunk in zip(chunk_ids, chunks):
        writer.write_chunk(k, **chunk)
    return writer.finalize(chunk_ids)


def test_round_trip(tmp_path):
    store = write_store(tmp_path / "s")
    assert not (tmp_path / "s" / "chunks").exists()
    assert len(store) == 5 and store.num_regions == 9 and store.dim == DIM
    assert store.image_ids.tolist() == [1, 2, 5, 8, 9]
    assert store.meta["num_images_without_regions"] == 1 and store.meta["top_k"] == 3 and store.meta["complete"]
    for chunk in CHUNKS:
        starts = np.cumsum(chunk["counts"]) - chunk["counts"]
        for image_id, start, count in zip(chunk["image_ids"].tolist(), starts.tolist(), chunk["counts"].tolist()):
            boxes, embeds = store.get(image_id)
            assert boxes.dtype == embeds.dtype == np.float32 and boxes.shape == (count, 4) and embeds.shape == (count, DIM)
            np.testing.assert_array_equal(boxes, chunk["boxes"][start : start + count])
            np.testing.assert_allclose(embeds, chunk["embeds"][start : start + count], atol=1e-3)  # float16 on disk
    assert 2 in store and 3 not in store
    boxes, embeds = store.get(3)  # absent: empty, not a KeyError
    assert boxes.shape == (0, 4) and embeds.shape == (0, DIM)
    boxes[...] = 0  # fresh arrays, not views of the read-only maps
    store.get(1)[0][:] = -1
    assert (store.get(1)[0] >= 0).all()

    embeds = np.load(tmp_path / "s" / "embeddings.npy", mmap_mode="r", allow_pickle=False)
    assert embeds.dtype == np.float16 and embeds.shape == (9, DIM)
    assert np.load(tmp_path / "s" / "index.npy", allow_pickle=False).tolist() == [
        [1, 0, 3], [2, 3, 0], [5, 3, 2], [8, 5, 1], [9, 6, 3]]


def test_pickles_without_arrays(tmp_path):
    store = RegionStore.open(write_store(tmp_path / "s").path)
    store.get(1)
    payload = pickle.dumps(store)
    assert len(payload) < 1000 and b"embeddings" not in payload.replace(b"embeddings.npy", b"")
    clone = pickle.loads(payload)
    assert clone._arrays is None  # mapped again on first use, in the worker
    np.testing.assert_array_equal(clone.get(5)[1], store.get(5)[1])
    assert clone.meta == store.meta


def test_empty_store(tmp_path):
    store = write_store(tmp_path / "s", chunks=[fake_chunk([4, 6], [0, 0], 0)])
    assert len(store) == 2 and store.num_regions == 0 and store.get(4)[1].shape == (0, DIM)


def test_truncated_array_is_named(tmp_path):
    path = write_store(tmp_path / "s").path
    size = (path / "embeddings.npy").stat().st_size
    with open(path / "embeddings.npy", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ValueError, match=r"embeddings\.npy is truncated or corrupt"):
        RegionStore.open(path)
    with open(path / "embeddings.npy", "r+b") as f:
        f.truncate(20)  # inside the header
    with pytest.raises(ValueError, match=r"embeddings\.npy is truncated or corrupt"):
        RegionStore.open(path)
    path = write_store(tmp_path / "t").path
    (path / "boxes.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"boxes\.npy"):
        RegionStore.open(path)


def test_arrays_must_agree_with_meta(tmp_path):
    path = write_store(tmp_path / "s").path
    np.save(path / "boxes.npy", np.zeros((8, 4), np.float32))
    with pytest.raises(ValueError, match=r"boxes\.npy holds float32 \[8, 4\], but meta\.json says float32 \[9, 4\]"):
        RegionStore.open(path)


def test_model_and_dim_mismatch_name_both_values(tmp_path):
    path = write_store(tmp_path / "s").path
    assert RegionStore.open(path, expected_model="toy", expected_dim=DIM).dim == DIM
    with pytest.raises(ValueError, match=r"dim 8, but dim 512 is expected"):
        RegionStore.open(path, expected_dim=512)
    with pytest.raises(ValueError, match=r"model 'toy', but model 'ViT-B-32' is expected"):
        RegionStore.open(path, expected_model="ViT-B-32")


def test_incomplete_store_is_refused(tmp_path):
    path = write_store(tmp_path / "s").path
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        RegionStore.open(path)

    writer = RegionStoreWriter(tmp_path / "partial", job=JOB)
    writer.write_chunk(0, **CHUNKS[0])
    with pytest.raises(ValueError, match="incomplete .*interrupted"):
        RegionStore.open(tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="not a region store"):
        RegionStore.open(tmp_path)


def test_writer_resumes_only_the_same_job(tmp_path):
    path = tmp_path / "s"
    writer = RegionStoreWriter(path, job=JOB)
    writer.write_chunk(0, **CHUNKS[0])
    with pytest.raises(ValueError, match=r"chunks \[1\] are not written"):
        writer.finalize([0, 1])

    leftovers = [path / ".embeddings.npy.x1.tmp", path / "chunks" / ".000001.npz.x2.tmp"]  # of a SIGKILL
    for p in leftovers:
        p.write_bytes(b"partial")
    again = RegionStoreWriter(path, job=JOB)  # a rerun after a kill
    assert again.has_chunk(0) and not again.has_chunk(1)
    assert not any(p.exists() for p in leftovers)
    with pytest.raises(FileExistsError, match=r"partial extraction with other settings \(top_k: 3 \(existing\) vs 5"):
        RegionStoreWriter(path, job={**JOB, "top_k": 5})
    assert not RegionStoreWriter(path, job={**JOB, "top_k": 5}, overwrite=True).has_chunk(0)

    path = write_store(tmp_path / "t").path
    assert RegionStoreWriter(path, job=JOB).complete  # finished: nothing to redo
    with pytest.raises(FileExistsError, match="region store made with other settings"):
        RegionStoreWriter(path, job={**JOB, "model_name": "other"})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        RegionStoreWriter(tmp_path / "junk", job=JOB)
    with pytest.raises(ValueError, match=r"embeds \(3, 8\) \(expected \[2, 8\]\)"):
        RegionStoreWriter(tmp_path / "bad", job=JOB).write_chunk(
            0, image_ids=[1], counts=[2], boxes=np.zeros((2, 4)), embeds=np.zeros((3, DIM)))


def test_merge_shards(tmp_path):
    # Chunks 0 and 2 in shard 0/2, chunk 1 in shard 1/2: the merge interleaves them by image id.
    chunks = [fake_chunk([1, 2], [2, 1], 0), fake_chunk([3, 4], [0, 2], 1), fake_chunk([5], [3], 2)]
    whole = write_store(tmp_path / "whole", chunks=chunks, job={**JOB, "shard": None})
    shard0 = write_store(tmp_path / "s0", chunks=[chunks[0], chunks[2]], chunk_ids=[0, 2], job={**JOB, "shard": [0, 2]})
    shard1 = write_store(tmp_path / "s1", chunks=[chunks[1]], chunk_ids=[1], job={**JOB, "shard": [1, 2]})
    merged = merge_stores([shard1.path, shard0.path], tmp_path / "merged")
    for name in ("embeddings.npy", "boxes.npy", "index.npy", "meta.json"):
        assert (merged.path / name).read_bytes() == (whole.path / name).read_bytes(), name

    with pytest.raises(FileExistsError):
        merge_stores([shard0.path, shard1.path], tmp_path / "merged")
    # More shards than chunks: the extra shard is empty.
    empty0, empty1 = (write_store(tmp_path / f"e{i}", chunks=[], chunk_ids=[], job={**JOB, "shard": [i, 2]})
                      for i in range(2))
    assert len(empty1) == 0 and empty1.get(1)[0].shape == (0, 4)
    assert merge_stores([shard0.path, empty1.path], tmp_path / "m0").image_ids.tolist() == [1, 2, 5]
    assert len(merge_stores([empty0.path, empty1.path], tmp_path / "m1")) == 0
    with pytest.raises(ValueError, match="shards 0..1 .* exactly once"):
        merge_stores([shard0.path], tmp_path / "m2")
    with pytest.raises(ValueError, match="is not a shard"):
        merge_stores([whole.path, shard1.path], tmp_path / "m2")
    other = write_store(tmp_path / "o1", chunks=[chunks[1]], chunk_ids=[1], job={**JOB, "shard": [1, 2], "top_k": 9})
    with pytest.raises(ValueError, match="top_k: 3 .* vs 9"):
        merge_stores([shard0.path, other.path], tmp_path / "m2")
    overlap = write_store(tmp_path / "o2", chunks=[chunks[2]], chunk_ids=[1], job={**JOB, "shard": [1, 2]})
    with pytest.raises(ValueError, match=r"overlap: image ids \[5\]"):
        merge_stores([shard0.path, overlap.path], tmp_path / "m2")
