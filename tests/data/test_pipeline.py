"""Tests for covid3d.data.pipeline (grain batches, host slices, state)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest

from covid3d.data import phantom_writers
from covid3d.data import pipeline
from covid3d.data import preprocess
from covid3d.data import readers
from covid3d.data import schema

SIZE = 16


def make_record(i: int, size: int = SIZE) -> dict:
  """A record whose volume encodes i (all voxels i/64 + a ramp)."""
  ramp = np.arange(size ** 3, dtype=np.float32).reshape((size,) * 3) / size**3
  return {
      "scan_id": f"scan_{i:03d}",
      f"volume_{size}": (i / 64 + ramp).astype(np.float16),
      f"mask_{size}": (ramp > 0.5).astype(np.uint8) * (i % 2),
      "has_mask": i % 2,
      "covid": i % 2,
      "severity": -1 if i % 5 == 0 else i % 4,
      "stoic_covid": -1,
      "stoic_severe": -1,
  }


def make_source(n: int) -> pipeline.RecordSource:
  recs = [make_record(i) for i in range(n)]
  return pipeline.RecordSource(recs, tuple(map(schema.index_entry, recs)),
                               "test records")


FIELDS = (f"volume_{SIZE}", f"mask_{SIZE}", "severity", "has_mask")


def host_batches(source, indices, count, **kwargs):
  kwargs.setdefault("fields", FIELDS)
  ds = pipeline.host_dataset(source, indices, **kwargs)
  it = iter(ds)
  return [next(it) for _ in range(count)]


def test_select_records():
  source = make_source(23)
  fold_of = {f"scan_{i:03d}": i % 3 for i in range(23)}
  got = pipeline.select_records(source, label="severity", fold_of=fold_of,
                                folds={0, 2})
  expect = [i for i in range(23) if i % 5 != 0 and i % 3 in (0, 2)]
  np.testing.assert_array_equal(got, expect)
  np.testing.assert_array_equal(pipeline.select_records(source), range(23))
  del fold_of["scan_004"]
  with pytest.raises(ValueError, match="scan_004"):
    pipeline.select_records(source, fold_of=fold_of, folds={1})
  with pytest.raises(ValueError, match="label"):
    pipeline.select_records(source, label="grade")


def test_train_batches_shuffle_per_epoch_and_convert():
  source = make_source(13)
  indices = np.arange(1, 12)  # 11 records, G=4: 2 batches/epoch, 3 dropped
  batches = host_batches(source, indices, 6, global_batch_size=4, train=True,
                         seed=7)
  epochs = [np.concatenate([b["record_index"] for b in batches[e:e + 2]])
            for e in (0, 2, 4)]
  for order in epochs:
    assert len(set(order.tolist())) == 8 and set(order) <= set(indices)
  assert len({tuple(o) for o in epochs}) == 3  # a new permutation each epoch
  b = batches[0]
  assert b[FIELDS[0]].dtype == np.float32
  assert b[FIELDS[0]].shape == b[FIELDS[1]].shape == (4,) + (SIZE,) * 3 + (1,)
  assert b[FIELDS[1]].dtype == np.uint8 and b["severity"].dtype == np.int32
  assert b["valid"].all()
  for row, i in enumerate(b["record_index"]):
    rec = make_record(int(i))
    np.testing.assert_array_equal(b[FIELDS[0]][row, ..., 0],
                                  rec[FIELDS[0]].astype(np.float32))
    np.testing.assert_array_equal(b[FIELDS[1]][row, ..., 0], rec[FIELDS[1]])
    assert b["severity"][row] == rec["severity"]
  again = host_batches(source, indices, 6, global_batch_size=4, train=True,
                       seed=7)
  other = host_batches(source, indices, 6, global_batch_size=4, train=True,
                       seed=8)
  ids = lambda bs: np.stack([x["record_index"] for x in bs])
  np.testing.assert_array_equal(ids(batches), ids(again))
  assert not np.array_equal(ids(batches), ids(other))


@pytest.mark.parametrize("train", [True, False])
def test_hosts_split_the_same_global_batches(train):
  """The per-process batches, concatenated, are the one-process batches."""
  source = make_source(22)
  indices = np.arange(22)
  kw = dict(global_batch_size=6, train=train, seed=3, fields=("severity",))
  single = host_batches(source, indices, 4, **kw)
  hosts = [host_batches(source, indices, 4, process_index=p, process_count=3,
                        **kw) for p in range(3)]
  for step in range(4):
    for key in ("record_index", "valid", "severity"):
      joined = np.concatenate([h[step][key] for h in hosts])
      np.testing.assert_array_equal(joined, single[step][key])


def test_eval_pads_and_masks_every_record_once():
  source = make_source(10)
  indices = np.array([0, 2, 3, 5, 7, 8, 9])
  # G=6 over 3 processes: the second batch has 1 real record, so processes
  # 1 and 2 see padding only.
  steps = 2  # ceil(7 / 6)
  hosts = [host_batches(source, indices, steps, global_batch_size=6,
                        train=False, process_index=p, process_count=3)
           for p in range(3)]
  seen, padded = [], 0
  for batches in hosts:
    for b in batches:
      assert b[FIELDS[0]].shape == (2,) + (SIZE,) * 3 + (1,)
      valid = b["valid"]
      seen += b["record_index"][valid].tolist()
      padded += int((~valid).sum())
      assert (b["record_index"][~valid] == -1).all()
      assert (b["severity"][~valid] == -1).all()
      assert (b[FIELDS[0]][~valid] == 0).all()
  assert sorted(seen) == indices.tolist()  # each record exactly once
  assert padded == 6 * steps - len(indices)
  it = iter(pipeline.host_dataset(source, indices, global_batch_size=6,
                                  train=False, fields=FIELDS))
  for _ in range(steps):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_batch_keys_from_a_mapping():
  source = make_source(6)
  fields = {"image": f"volume_{SIZE}", "label": "severity"}
  b, = host_batches(source, np.arange(1, 5), 1, global_batch_size=4,
                    train=False, fields=fields)
  assert set(b) == {"image", "label", "valid", "record_index"}
  np.testing.assert_array_equal(b["label"], [1, 2, 3, 0])
  want = make_record(3)[f"volume_{SIZE}"].astype(np.float32)
  np.testing.assert_array_equal(b["image"][2, ..., 0], want)
  with pytest.raises(ValueError, match="reserved"):
    pipeline.host_dataset(source, np.arange(5), global_batch_size=2,
                          train=True, fields={"valid": "severity"})


def test_volumes_keep_the_cached_dtype_when_asked():
  source = make_source(5)
  fields = {"image": f"volume_{SIZE}"}
  b, = host_batches(source, np.arange(5), 1, global_batch_size=4, train=False, fields=fields,
                    volume_dtype=None)
  assert b["image"].dtype == np.float16
  np.testing.assert_array_equal(b["image"][3, ..., 0], make_record(3)[f"volume_{SIZE}"])
  last = host_batches(source, np.arange(5), 2, global_batch_size=4, train=False,
                      fields=fields, volume_dtype=None)[1]
  assert last["image"].dtype == np.float16 and not last["image"][1:].any()


def test_file_source_from_the_cache(tmp_path):
  phantom_writers.write_stoic(tmp_path / "raw", 3, 2, sizes=(32, 40),
                              slices=(16, 20))
  refs = readers.list_stoic(tmp_path / "raw")
  paths = preprocess.build_cache(refs, str(tmp_path / "cache"), (16,),
                                 workers=1, progress=False)
  source = pipeline.file_source(paths)
  assert [e["scan_id"] for e in source.index] == [r.scan_id for r in refs]
  records = [preprocess.read_record(p) for p in paths]
  assert list(source.index) == [dict(schema.index_entry(r), partition="train") for r in records]
  batch, = host_batches(source, np.arange(3), 1, global_batch_size=3,
                        train=False, fields=("volume_16", "stoic_severe"))
  for row, record in enumerate(records):
    np.testing.assert_array_equal(batch["volume_16"][row, ..., 0],
                                  record["volume_16"].astype(np.float32))
    assert batch["stoic_severe"][row] == record["stoic_severe"]
  stray = tmp_path / "cache" / "other.npz"
  stray.write_bytes(b"")
  with pytest.raises(ValueError, match="other.npz"):
    pipeline.file_source([str(stray)])


def test_bad_batch_sizes():
  source = make_source(5)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline.host_dataset(source, np.arange(5), global_batch_size=8,
                          train=True, fields=FIELDS)
  with pytest.raises(ValueError, match="divisible by the process count"):
    pipeline.host_dataset(source, np.arange(5), global_batch_size=3,
                          train=True, fields=FIELDS, process_count=2)
  with pytest.raises(ValueError, match="cannot be batched"):
    schema.to_numpy(make_record(0), ["scan_id"])


def test_state_restore_gives_the_same_batches():
  source = make_source(17)
  indices = pipeline.select_records(source)
  kw = dict(global_batch_size=4, fields=FIELDS, train=True, seed=11)
  it = iter(pipeline.host_dataset(source, indices, **kw))
  for _ in range(5):  # crosses the epoch boundary (4 batches per epoch)
    next(it)
  state = json.dumps(it.get_state())
  after = [next(it) for _ in range(3)]
  resumed = iter(pipeline.host_dataset(source, indices, **kw))
  resumed.set_state(json.loads(state))
  for a, b in zip(after, [next(resumed) for _ in range(3)], strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


_MULTIHOST = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update('jax_num_cpu_devices', 2)
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import numpy as np
    from jax.experimental import multihost_utils
    sys.path.insert(0, sys.argv[3])
    from test_pipeline import make_source
    from covid3d.data import pipeline
    from covid3d.train import steps
    source = make_source(11)
    mesh = steps.make_mesh()
    out = []
    for train in (True, False):
      it = iter(pipeline.host_dataset(
          source, np.arange(11), global_batch_size=4, fields=('severity',),
          train=train, seed=5, process_index=jax.process_index(),
          process_count=jax.process_count()))
      for _ in range(3):
        b = steps.shard_batch(next(it), mesh)
        assert b['severity'].shape == (4,)
        assert len(b['severity'].sharding.device_set) == 4
        out.append({k: multihost_utils.process_allgather(v, tiled=True
                                                         ).tolist()
                    for k, v in b.items()})
    print('RESULT' + json.dumps(out))
    jax.distributed.shutdown()
""")


def test_two_processes_build_the_global_batches(tmp_path):
  """2 processes x 2 CPU devices (gloo): the gathered global batches equal
  the one-process batches, so no record is lost or duplicated."""
  script = tmp_path / "multihost.py"
  script.write_text(_MULTIHOST)
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, str(script), f"127.0.0.1:{port}", str(p),
       os.path.dirname(__file__)], stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env=env) for p in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (_out, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(out.split("RESULT")[1]) for out, _ in outs]
  assert results[0] == results[1]
  source = make_source(11)
  expect = []
  for train in (True, False):
    expect += host_batches(source, np.arange(11), 3, global_batch_size=4,
                           train=train, seed=5, fields=("severity",))
  assert len(results[0]) == len(expect)
  for got, want in zip(results[0], expect, strict=True):
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_unshuffled_training_reads_the_given_order_every_epoch():
  source = make_source(10)
  order = np.array([7, 2, 9, 0, 5, 3, 8, 1])
  batches = host_batches(source, order, 8, global_batch_size=2, train=True, shuffle=False,
                         fields=("severity",))
  read = np.concatenate([b["record_index"] for b in batches])
  np.testing.assert_array_equal(read, np.tile(order, 2))      # two epochs, the same order
  shuffled = host_batches(source, order, 4, global_batch_size=2, train=True, fields=("severity",))
  assert list(np.concatenate([b["record_index"] for b in shuffled])) != list(order)
