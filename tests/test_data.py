"""Data sources and grain pipelines: formats, determinism, sharding, resume, augmentation, error policy."""

from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import data as D
from data import synth_vqa as S
from data.idx import read_idx
from data.text import words


def write_idx(path: pathlib.Path, arr: np.ndarray, *, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_any_folder_with_the_four_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 256, (n, 28, 28)) for s, n in (("train", 12), ("t10k", 5))}
    for s, arr in imgs.items():
        write_idx(tmp_path / f"{s}-images-idx3-ubyte", arr, gz=gz)
        write_idx(tmp_path / f"{s}-labels-idx1-ubyte", np.arange(len(arr)) % 10, gz=gz)
    src = D.fashion_mnist("test", str(tmp_path))
    assert len(src) == 5
    rec = src[3]
    assert rec["image"].shape == (28, 28, 1) and rec["image"].dtype == np.uint8
    np.testing.assert_array_equal(rec["image"][:, :, 0], imgs["t10k"][3])
    assert rec["label"] == 3
    with pytest.raises(D.DataError, match="not found"):
        D.fashion_mnist("train", str(tmp_path / "nowhere"))


def test_idx_truncated_file_names_the_file(tmp_path):
    write_idx(tmp_path / "x-idx", np.zeros((4, 3, 3)), gz=False)
    p = tmp_path / "x-idx"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(D.DataError, match=r"x-idx.*truncated"):
        read_idx(p)


def test_fashion_mnist_debian_files():
    if not pathlib.Path(D.fashion_mnist.__globals__["DEFAULT_DIR"]).exists():
        pytest.skip("Debian dataset-fashion-mnist is not installed")
    tr, te = D.fashion_mnist("train"), D.fashion_mnist("test")
    assert (len(tr), len(te)) == (60000, 10000)
    assert np.bincount(te.arrays["label"]).tolist() == [1000] * 10


def test_animal_mnist_stratified_disjoint_split():
    tr, te = D.animal_mnist("train"), D.animal_mnist("test")
    assert (len(tr), len(te)) == (8000, 2000)
    assert np.bincount(te.arrays["label"]).tolist() == [200] * 10
    all_ = D.animal_mnist("all").arrays["image"].reshape(10000, -1)
    key = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}
    assert len(key(tr.arrays["image"]) | key(te.arrays["image"])) == len(key(all_))


def test_easy_vqa_records_match_the_question_file():
    src = D.easy_vqa("test", limit=20)
    raw = json.loads((D.easy_vqa.__globals__["easy_vqa_dir"]() / "test" / "questions.json").read_text())
    rec = src[7]
    q, a, image_id = raw[7]
    assert src.vocab.decode(rec["question"]) == " ".join(words(q))
    assert src.answers[int(rec["answer"])] == a
    assert rec["image"].shape == (64, 64, 3) and rec["question"].dtype == np.int32
    ref = np.asarray(Image.open(src.items[7][0]).convert("RGB"))
    np.testing.assert_array_equal(rec["image"], ref)
    assert str(image_id) + ".png" in src.items[7][0]


def test_word_vocab():
    v = D.WordVocab.from_texts(["Is the cat red?", "the dog"])
    ids = v.encode("the red zebra", 5)
    assert ids.tolist()[:3] == [v.stoi["the"], v.stoi["red"], 1] and ids.tolist()[3:] == [0, 0]
    assert v.decode(ids) == "the red <unk>"


# -- generated VQA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["shapes", "emoji"])
def test_synth_vqa_deterministic_and_answers_follow_the_scene(style):
    if style == "emoji" and not S.emoji_available():
        pytest.skip("Noto colour emoji font or emoji-test.txt missing")
    a = D.SynthVQA("train", size=60, seed=3, style=style)
    b = D.SynthVQA("train", size=60, seed=3, style=style)
    seen = set()
    for i in range(60):
        ra, rb, ex = a[i], b[i], a.example(i)
        np.testing.assert_array_equal(ra["image"], rb["image"])
        assert ra["question"].tolist() == rb["question"].tolist() and ra["answer"] == rb["answer"]
        objs, q, ans = ex["objects"], ex["question_text"], ex["answer_text"]
        assert a.answers[int(ra["answer"])] == ans and a.vocab.decode(ra["question"]) == q
        assert len({(o[2], o[3]) for o in objs}) == len(objs) == len({(o[0], o[1]) for o in objs})
        w = q.split()
        if q.startswith("how many") and w[2].rstrip("s") in S.SHAPES:
            assert int(ans) == sum(o[1] == w[2][:-1] for o in objs)
        elif q.startswith("how many"):
            assert int(ans) == sum(o[0] == w[2] for o in objs)
        elif q.startswith("what colour"):
            r, c = int(w[7]) - 1, int(w[9]) - 1
            assert [o[0] for o in objs if (o[2], o[3]) == (r, c)] == [ans]
        else:
            assert ans in ("yes", "no")
        seen.add(int(ra["qtype"]))
        # every object's sprite is painted in its cell (not background)
        cell = a.cell
        for _, _, r, c in objs:
            patch = ra["image"][r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].astype(int)
            assert np.abs(patch - np.array(S._BACKGROUND)).sum(-1).max() > 60
    assert seen == {0, 1, 2, 3}
    other = D.SynthVQA("test", size=60, seed=3, style=style)
    assert not np.array_equal(other[0]["image"], a[0]["image"])


@pytest.mark.parametrize("style", ["shapes", "emoji"])
def test_synth_vqa_sparse_families_name_one_object_and_default_families_are_unchanged(style):
    if style == "emoji" and not S.emoji_available():
        pytest.skip("Noto colour emoji font or emoji-test.txt missing")
    fam = ("colour_of", "shape_of", "count")
    a = D.SynthVQA("train", size=90, seed=1, image_size=112, grid=7, min_objects=1, max_objects=3, style=style,
                   families=fam, distinct=True)
    seen, counts = set(), set()
    for i in range(90):
        rec, ex = a[i], a.example(i)
        objs, q, ans = ex["objects"], ex["question_text"], ex["answer_text"]
        assert a.answers[int(rec["answer"])] == ans and a.vocab.decode(rec["question"]) == q
        assert len({o[0] for o in objs}) == len({o[1] for o in objs}) == len(objs)    # distinct colours, shapes
        w = q.split()
        if q.startswith("what colour is the"):
            assert [o[0] for o in objs if o[1] == w[4]] == [ans]
        elif q.startswith("what shape is the"):
            assert [o[1] for o in objs if o[0] == w[4]] == [ans]
        else:
            assert q == "how many objects are there" and int(ans) == len(objs)
            counts.add(len(objs))
        seen.add(S.QTYPES[int(rec["qtype"])])
        # the objects are small: most of the canvas is background
        bg = (np.abs(rec["image"].astype(int) - np.array(S._BACKGROUND)).sum(-1) <= 30).mean()
        assert bg > 1 - 3 * (a.obj / 112) ** 2 - 0.01
    assert seen == set(fam) and counts == {1, 2, 3}
    # the default families draw exactly what they drew before the new ones existed
    d = D.SynthVQA("val", size=20, seed=4, style=style)
    e = D.SynthVQA("val", size=20, seed=4, style=style, families=S.QTYPES[:4])
    assert d.vocab.itos == e.vocab.itos == S.question_vocab(4).itos
    for i in range(20):
        np.testing.assert_array_equal(d[i]["image"], e[i]["image"])
        assert d.example(i)["question_text"] == e.example(i)["question_text"]
        assert S.QTYPES[int(d[i]["qtype"])] in S.QTYPES[:4]


def test_synth_vqa_rejects_bad_families():
    with pytest.raises(ValueError, match="distinct=True"):
        D.SynthVQA(families=("colour_of",))
    with pytest.raises(ValueError, match="max_objects must be <= 3"):
        D.SynthVQA(families=("count",), distinct=True, max_objects=4)
    with pytest.raises(ValueError, match="families must be"):
        D.SynthVQA(families=("colour",))
    with pytest.raises(ValueError, match="families must be"):
        D.SynthVQA(families=())


def test_synth_vqa_rejects_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        D.SynthVQA(image_size=50, grid=4)
    with pytest.raises(ValueError, match="split"):
        D.SynthVQA("dev")


# -- pipelines -------------------------------------------------------------------------------------------


def index_source(n=40):
    return D.ArraySource({"image": np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8),
                          "label": np.arange(n, dtype=np.int32)})


def take(ds, k):
    it = iter(ds)
    return [next(it)["label"].tolist() for _ in range(k)]


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    src = index_source()
    a = take(D.train_dataset(src, batch_size=8, seed=1), 10)
    b = take(D.train_dataset(src, batch_size=8, seed=1), 10)
    c = take(D.train_dataset(src, batch_size=8, seed=2), 10)
    assert a == b and a != c
    epoch1, epoch2 = sum(a[:5], []), sum(a[5:10], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(40)) and epoch1 != epoch2


def test_per_host_shards_are_disjoint_and_cover():
    src = index_source()
    shards = [sum(take(D.train_dataset(src, batch_size=8, seed=0, shard_index=i, shard_count=2), 5), [])
              for i in range(2)]
    assert all(len(s) == 20 for s in shards)  # 4 rows per host per step
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(40))
    with pytest.raises(ValueError, match="divisible"):
        D.train_dataset(src, batch_size=7, seed=0, shard_index=0, shard_count=2)


def test_iterator_state_resumes_the_stream():
    src = index_source()
    aug = D.Augment(crop_padding=1, flip=True)
    ds = D.train_dataset(src, batch_size=8, seed=0, augment=aug)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(4)]
    it2 = iter(D.train_dataset(src, batch_size=8, seed=0, augment=aug))
    it2.set_state(json.loads(json.dumps(state)))
    for want in rest:
        got = next(it2)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_augment_crop_and_flip():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    rec = {"image": img, "label": np.int32(0)}
    flips, shifts = 0, set()
    for s in range(40):
        out = D.Augment(crop_padding=1, flip=True)(rec, np.random.default_rng(s))["image"]
        assert out.shape == img.shape
        flipped = any(np.array_equal(out[1:3, 1:3], img[r:r + 2, ::-1][:, c:c + 2]) for r in range(3) for c in range(3))
        flips += flipped
        shifts.add(out.tobytes())
    assert 5 < flips < 35 and len(shifts) > 5
    assert D.Augment()(rec, np.random.default_rng(0))["image"] is img


def test_eval_batches_pad_and_mask_each_example_once():
    src = index_source(23)
    seen = []
    for h in range(2):
        for batch in D.eval_batches(src, batch_size=10, shard_index=h, shard_count=2):
            assert batch["label"].shape == (5,) and batch["mask"].shape == (5,)
            seen += batch["label"][batch["mask"]].tolist()
    assert sorted(seen) == list(range(23))
    assert D.num_eval_batches(src, 10) == 3


def make_folder(tmp_path, bad=True):
    for c, colour in (("cats", 40), ("dogs", 200)):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((20, 30, 3), colour, np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    if bad:
        (tmp_path / "train" / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")


def test_image_folder_labels_and_resize(tmp_path):
    make_folder(tmp_path, bad=False)
    src = D.image_folder(str(tmp_path), "train", size=16)
    assert src.classes == ["cats", "dogs"] and len(src) == 12
    rec = src[7]
    assert rec["image"].shape == (16, 16, 3) and int(rec["label"]) == 1 and rec["image"].mean() == 200


def test_corrupt_image_raises_naming_the_file_or_is_skipped_and_counted(tmp_path):
    make_folder(tmp_path)
    strict = D.image_folder(str(tmp_path), "train", size=16)
    with pytest.raises(D.DataError, match=r"broken\.jpg"):
        for _ in D.eval_batches(strict, batch_size=13):
            pass
    lax = D.image_folder(str(tmp_path), "train", size=16, on_error="skip")
    it = iter(D.train_dataset(lax, batch_size=4, seed=0, num_epochs=1, num_threads=1))
    labels = [b["label"] for b in it]
    assert len(labels) == 3  # 12 readable of 13, batches of 4, remainder dropped
    assert lax.stats.skipped == 1 and lax.stats.files[0].endswith("broken.jpg")
    masked = list(D.eval_batches(lax, batch_size=13))
    assert int(masked[0]["mask"].sum()) == 12


def test_make_source_dispatch_and_errors():
    src = D.make_source({"name": "synthetic", "size": 32, "image_size": 8, "num_classes": 3}, "train")
    assert len(src) == 32 and src[0]["image"].shape == (8, 8, 3)
    assert isinstance(D.make_source({"name": "synth_vqa", "size": 5, "style": "shapes"}, "val"), D.SynthVQA)
    with pytest.raises(ValueError, match="unknown data.name"):
        D.make_source({"name": "cifar"}, "train")
    with pytest.raises(D.DataError, match="data.path"):
        D.make_source({"name": "image_folder"}, "train")


def test_missing_split_folder_raises_naming_it_and_empty_folders_are_refused(tmp_path):
    make_folder(tmp_path, bad=False)              # only train/ exists
    with pytest.raises(D.DataError, match=r"split '.*/val' does not exist.*\['train'\].*split=None"):
        D.image_folder(str(tmp_path), "val", size=16)   # before: classes ['train'], every label 0
    flat = D.image_folder(str(tmp_path / "train"), None, size=16)   # root/<class>/ layout, asked for explicitly
    assert flat.classes == ["cats", "dogs"]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(D.DataError, match=r"empty.*no image files"):
        D.image_folder(str(tmp_path), "empty", size=16)


def test_all_images_unreadable_with_skip_raises_instead_of_hanging(tmp_path):
    import threading

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "train" / c / f"{i}.png").write_bytes(b"not a png")
    src = D.image_folder(str(tmp_path), "train", size=16, on_error="skip")
    out = {}

    def first_batch():
        try:
            next(iter(D.train_dataset(src, batch_size=2, seed=0, num_threads=1)))   # repeats forever
        except Exception as err:  # noqa: BLE001 - inspected below
            out["err"] = err

    t = threading.Thread(target=first_batch, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "reading a source whose every file is unreadable hangs"
    assert isinstance(out.get("err"), D.DataError) and "none of its 6 image file(s)" in str(out["err"])
    assert src.stats.skipped >= 6
    # a source with one readable file still streams (it is the last distinct file that raises)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "train" / "a" / "ok.png")
    one = D.image_folder(str(tmp_path), "train", size=16, on_error="skip")
    batch = next(iter(D.train_dataset(one, batch_size=2, seed=0, num_threads=1)))
    assert batch["image"].shape == (2, 16, 16, 3)


def test_class_count_of_sources():
    syn = D.make_source({"name": "synthetic", "size": 32, "image_size": 8, "num_classes": 3}, "train")
    assert D.class_count(syn) == (3, 3)
    arr = D.ArraySource({"image": np.zeros((4, 2, 2, 1), np.uint8), "label": np.array([0, 5, 1, 2], np.int32)})
    assert D.class_count(arr) == (None, 6)
    files = D.FileImageSource([("x.png", {"label": 2}), ("y.png", {"label": 0})])
    assert D.class_count(files) == (None, 3)
