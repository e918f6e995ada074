"""TensorBoard/JSON logging, checkpoint retention, the checkpointable iterator."""
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from covid3d import storage, train
from covid3d.train import checkpoint, log
from covid3d.train.iterators import ArrayIterator
from train_helpers import folder_state, read_only_copy


def _event_class():
  """tensorflow.Event/Summary built from a descriptor here (field numbers of TF's event.proto)."""
  f = descriptor_pb2.FileDescriptorProto(name="event_test.proto", package="tft")
  T = descriptor_pb2.FieldDescriptorProto
  value = descriptor_pb2.DescriptorProto(name="Value")
  value.field.add(name="tag", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
  value.field.add(name="simple_value", number=2, type=T.TYPE_FLOAT, label=T.LABEL_OPTIONAL)
  summary = f.message_type.add(name="Summary")
  summary.nested_type.append(value)
  summary.field.add(name="value", number=1, type=T.TYPE_MESSAGE, label=T.LABEL_REPEATED,
                    type_name=".tft.Summary.Value")
  event = f.message_type.add(name="Event")
  event.field.add(name="wall_time", number=1, type=T.TYPE_DOUBLE, label=T.LABEL_OPTIONAL)
  event.field.add(name="step", number=2, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL)
  event.field.add(name="file_version", number=3, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
  event.field.add(name="summary", number=5, type=T.TYPE_MESSAGE, label=T.LABEL_OPTIONAL,
                  type_name=".tft.Summary")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tft.Event"))


def _events(path) -> list:
  """The ``Event`` records of a TFRecord file, their CRCs checked."""
  data, records = path.read_bytes(), []
  while data:
    (n,) = struct.unpack("<Q", data[:8])
    assert struct.unpack("<I", data[8:12])[0] == log.masked_crc32c(data[:8])
    body = data[12:12 + n]
    assert struct.unpack("<I", data[12 + n:16 + n])[0] == log.masked_crc32c(body)
    records.append(body)
    data = data[16 + n:]
  Event = _event_class()
  return [Event.FromString(r) for r in records]


def test_crc32c_known_values():
  assert log.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert log.crc32c(b"") == 0
  assert log.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_event_file_parses_as_tensorflow_events(tmp_path):
  logger = log.MetricLogger(str(tmp_path))
  logger.write(3, "train", {"loss": 0.5, "lr": np.float32(1e-4), "skip_me": np.zeros(3)})
  logger.write(300, "eval", {"macro_f1": 0.25})
  logger.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 3, "split": "train", "loss": 0.5, "lr": pytest.approx(1e-4)},
                   {"step": 300, "split": "eval", "macro_f1": 0.25}]
  (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  events = _events(path)
  assert events[0].file_version == "brain.Event:2"
  assert events[1].step == 3
  assert {v.tag: v.simple_value for v in events[1].summary.value} == {
      "train/loss": 0.5, "train/lr": pytest.approx(1e-4)}
  assert events[2].step == 300 and events[2].summary.value[0].tag == "eval/macro_f1"


def test_disabled_logger_writes_nothing(tmp_path):
  logger = log.MetricLogger(str(tmp_path / "x"), enabled=False)
  logger.write(1, "train", {"loss": 1.0})
  logger.close()
  assert not (tmp_path / "x").exists()


def test_checkpointer_keeps_latest_and_best(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric="macro_f1")
  config = train.default_config()
  scores = {2: 0.9, 4: 0.5, 6: 0.7}
  for step in range(1, 8):
    state = {"w": jnp.full((3,), float(step))}
    metrics = {"macro_f1": scores[step]} if step in scores else None
    ckpt.save(step, state, {"batch": step}, config, metrics)
  ckpt.wait()
  assert ckpt.manager.all_steps() == [2, 6, 7]
  assert ckpt.best_step() == 2
  state, it = ckpt.restore(6, {"w": jnp.zeros(3)})
  np.testing.assert_array_equal(state["w"], [6.0, 6.0, 6.0])
  assert it == {"batch": 6}
  ckpt.close()
  reopened = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric="macro_f1")
  assert reopened.best_step() == 2 and reopened.latest_step() == 7
  np.testing.assert_array_equal(reopened.restore(2, {"w": jnp.zeros(3)})[0]["w"], [2.0] * 3)
  cfg = json.loads((tmp_path / "7" / "config" / "metadata").read_text())
  assert cfg["batch_size"] == config.batch_size
  reopened.close()


def test_reading_checkpoints_creates_or_changes_no_file(tmp_path):
  """A finished run's checkpoints, read-only (as root, where chmod stops no writer, the
  before/after state of every file shows a write): opened, best step, parameters restored."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), keep=1, best_metric="dice")
  for step, dice in ((1, 0.7), (2, 0.3)):
    w = jnp.full((2,), float(step))
    ckpt.save(step, {"params": {"w": w}, "ema_params": {"w": -w}}, {}, train.default_config(),
              {"dice": dice})
  ckpt.wait()
  ckpt.close()
  before = read_only_copy(tmp_path / "run", tmp_path / "ro")
  reader = checkpoint.Checkpointer.open(str(tmp_path / "ro"))
  assert reader.best_step() == 1 and reader.latest_step() == 2
  np.testing.assert_array_equal(reader.restore_params(1)["w"], [-1.0, -1.0])
  reader.close()
  assert folder_state(tmp_path / "ro") == before
  assert (tmp_path / "ro" / checkpoint.RECORD).exists()   # the record the reader went by


def test_a_reader_picks_the_best_checkpoint_by_the_metric_its_run_recorded(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, best_metric="dice")
  for step, dice, f1 in ((1, 0.2, 0.9), (2, 0.8, 0.1), (3, 0.5, 0.5)):
    ckpt.save(step, {"w": jnp.full((2,), float(step))}, {}, train.default_config(),
              {"dice": dice, "macro_f1": f1})
  ckpt.wait()
  ckpt.close()
  reader = checkpoint.Checkpointer.open(str(tmp_path))
  assert reader.best_metric == "dice" and reader.best_step() == 2 and reader.latest_step() == 3
  reader.close()
  unrecorded = tmp_path / "imported"
  ckpt = checkpoint.Checkpointer(str(unrecorded), keep=1, best_metric=None)
  ckpt.save(0, {"w": jnp.ones(2)}, {}, train.default_config())
  ckpt.wait()
  ckpt.close()
  reader = checkpoint.Checkpointer.open(str(unrecorded))
  assert reader.best_step() is None and reader.latest_step() == 0
  reader.close()


@pytest.mark.parametrize("ties, min_gain, best_mid, best_end", [
    ("earliest", 1e-4, 1, 5),   # the authors' fine-tuning: a tie or a gain of 5e-5 keeps step 1
    ("earliest", 0.0, 3, 5),    # their pretrainings: strictly higher wins, a tie does not
    ("latest", 1e-4, 3, 6)])    # covid3d's earlier rule (Orbax's): the last of equal maxima
def test_ties_in_best_checkpoint_selection(tmp_path, ties, min_gain, best_mid, best_end):
  scores = {1: 0.5, 2: 0.5, 3: 0.50005, 4: float("nan"), 5: 0.5002, 6: 0.5002}
  config = train.default_config()

  def run(steps):   # a run, or its resumption: a fresh Checkpointer on the same directory
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, best_metric="macro_f1",
                                   min_gain=min_gain, ties=ties)
    for step in steps:
      ckpt.save(step, {"w": jnp.full((2,), float(step))}, {}, config, {"macro_f1": scores[step]})
    ckpt.wait()
    best = ckpt.best_step()
    ckpt.close()
    return best

  assert run((1, 2, 3, 4)) == best_mid
  assert run((5, 6)) == best_end
  reader = checkpoint.Checkpointer.open(str(tmp_path))
  assert reader.best_step() == best_end
  np.testing.assert_array_equal(reader.restore(best_end, {"w": jnp.zeros(2)})[0]["w"],
                                [float(best_end)] * 2)   # kept: the policy agrees
  reader.close()
  with pytest.raises(ValueError, match="best_ties"):
    checkpoint.Checkpointer(str(tmp_path / "x"), 1, "dice", ties="first")


def test_itstime():
  assert [s for s in range(1, 11) if train.itstime(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if train.itstime(s, 0, 10)] == [10]


def test_checkpointer_takes_a_relative_directory(tmp_path, monkeypatch):
  """The README's demo passes ./covid3d_demo/...; Orbax itself wants absolute paths."""
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.Checkpointer("run/checkpoints", keep=1, best_metric="dice")
  ckpt.save(1, {"w": jnp.ones(2)}, {"batch": 1}, train.default_config(), {"dice": 0.5})
  ckpt.wait()
  ckpt.close()
  reopened = checkpoint.Checkpointer("run/checkpoints", keep=1, best_metric="dice")
  np.testing.assert_array_equal(reopened.restore(1, {"w": jnp.zeros(2)})[0]["w"], [1.0, 1.0])
  reopened.close()
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
  assert str(storage.as_path("gs://bucket/run")) == "gs://bucket/run"


def test_array_iterator_resume_and_process_split():
  data = {"x": np.arange(10), "y": np.arange(10) * 2}
  full = ArrayIterator(data, 4, seed=3)
  batches = [next(full) for _ in range(5)]  # crosses an epoch (2 batches per epoch)
  assert sorted(np.concatenate([b["x"] for b in batches[:2]]).tolist()) != list(range(8))
  np.testing.assert_array_equal(batches[0]["y"], batches[0]["x"] * 2)
  resumed = ArrayIterator(data, 4, seed=3)
  resumed.set_state(json.loads(json.dumps(full.get_state())))
  again = ArrayIterator(data, 4, seed=3)
  for _ in range(5):
    next(again)
  np.testing.assert_array_equal(next(resumed)["x"], next(again)["x"])
  halves = [ArrayIterator(data, 4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  for b in batches:
    np.testing.assert_array_equal(np.concatenate([next(h)["x"] for h in halves]), b["x"])
  with pytest.raises(ValueError, match="differ in length"):
    ArrayIterator({"x": np.arange(3), "y": np.arange(4)}, 2)


def _steps(workdir) -> list[int]:
  return [row["step"] for row in log.read_metrics(workdir)]


def test_a_local_run_appends_to_one_file_and_one_reader_serves_both_layouts(tmp_path):
  logger = log.MetricLogger(str(tmp_path))
  logger.write(1, "train", {"loss": 1.0})
  logger.flush()
  logger.close()
  assert _steps(tmp_path) == [1] and not (tmp_path / log.METRICS_PARTS).exists()
  with open(tmp_path / log.METRICS_FILE, "a") as f:
    f.write('{"step": 2, "spl')  # a run killed while writing a row
  logger = log.MetricLogger(str(tmp_path))
  logger.write(2, "train", {"loss": 0.5})  # not joined to the torn row
  logger.close()
  assert _steps(tmp_path) == [1, 2]
  # A workdir copied from a bucket: its parts come after the file, by number.
  parts = tmp_path / log.METRICS_PARTS
  storage.write_text(parts / log.part_name(10), '{"step": 4}\n')
  storage.write_text(parts / log.part_name(9), '{"step": 3}\n{"step": 3.5}\n')
  (parts / "notes.txt").write_text("not a part")
  assert _steps(tmp_path) == [1, 2, 3, 3.5, 4]
  logger = log.MetricLogger(str(tmp_path), flush_every_s=float("inf"))  # continues the parts
  logger.write(5, "train", {"loss": 0.25})
  assert _steps(tmp_path) == [1, 2, 3, 3.5, 4]  # held until a flush
  logger.flush()
  logger.write(6, "eval", {"macro_f1": 0.5})
  logger.close()
  assert _steps(tmp_path) == [1, 2, 3, 3.5, 4, 5, 6]
  assert sorted(p.name for p in parts.glob("part-*")) == [log.part_name(n) for n in (9, 10, 11, 12)]
  tensorboard = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*.00000[12]"))
  assert [[(e.file_version, e.step) for e in _events(path)] for path in tensorboard] == [
      [("brain.Event:2", 0), ("", 5)], [("brain.Event:2", 0), ("", 6)]]


def test_parts_are_flushed_after_flush_every_s(tmp_path):
  (tmp_path / log.METRICS_PARTS).mkdir()
  logger = log.MetricLogger(str(tmp_path), flush_every_s=0.0)
  for step in (1, 2, 3):
    logger.write(step, "train", {"loss": 1.0 / step})
    assert _steps(tmp_path) == list(range(1, step + 1))
  logger.close()
  assert len(log.metric_parts(tmp_path)) == 3
