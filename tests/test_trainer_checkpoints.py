"""Hugging Face `Trainer` checkpoint folders, from a real (tiny, offline) Trainer run, as checkpoints."""

import json
import os
import shutil

import pytest
import torch
from conftest import assert_close
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from captum_tracin_we import HuggingFaceClassifier, load_checkpoint, save_checkpoint, trainer_checkpoints, TracInWE

VOCAB, LENGTH, N = 40, 6, 16


class Sentences(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (N, LENGTH), generator=g)
        self.labels = torch.randint(0, 2, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=16, max_position_embeddings=16)
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """8 steps (2 epochs of 4 batches) with a linear schedule, saved at steps 3, 6 and 8, every step logged."""
    output_dir = str(tmp_path_factory.mktemp("trainer"))
    model = tiny_bert()
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=4, num_train_epochs=2,
                             save_strategy="steps", save_steps=3, logging_steps=1, learning_rate=1e-3,
                             lr_scheduler_type="linear", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Sentences()).train()
    return output_dir


def logged_rate(folder, step):
    with open(os.path.join(folder, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    return next(entry["learning_rate"] for entry in history if entry.get("step") == step and "learning_rate" in entry)


def test_folders_are_found_in_step_order(trained, tmp_path):
    assert [os.path.basename(f) for f in trainer_checkpoints(trained)] == [
        "checkpoint-3", "checkpoint-6", "checkpoint-8"]
    for name in ("checkpoint-10", "checkpoint-9", "runs", "checkpoint-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a folder")
    assert [os.path.basename(f) for f in trainer_checkpoints(str(tmp_path))] == ["checkpoint-9", "checkpoint-10"]


def test_a_folder_loads_its_weights_and_the_rate_logged_at_its_step(trained):
    for folder, step in zip(trainer_checkpoints(trained), (3, 6, 8)):
        model = HuggingFaceClassifier(tiny_bert())
        rate = load_checkpoint(model, folder)
        # a linear decay from 1e-3 over 8 steps, as the Trainer logged it at that step
        assert rate == logged_rate(folder, step) == pytest.approx(1e-3 * (8 - (step - 1)) / 8)
        saved = load_file(os.path.join(folder, "model.safetensors"))
        for name, tensor in model.model.state_dict().items():
            if name in saved:
                assert torch.equal(tensor, saved[name]), name


def copy_as(trained, tmp_path, name):
    folder = str(tmp_path / name)
    shutil.copytree(trainer_checkpoints(trained)[1], folder)
    return folder, load_file(os.path.join(folder, "model.safetensors"))


def loaded_state(folder):
    model = tiny_bert()
    return load_checkpoint(model, folder), model.state_dict()


def test_pytorch_model_bin_and_sharded_weights_load_the_same(trained, tmp_path):
    rate, expected = loaded_state(trainer_checkpoints(trained)[1])
    binary, weights = copy_as(trained, tmp_path, "binary")
    os.remove(os.path.join(binary, "model.safetensors"))
    torch.save(weights, os.path.join(binary, "pytorch_model.bin"))
    sharded, _ = copy_as(trained, tmp_path, "sharded")
    os.remove(os.path.join(sharded, "model.safetensors"))
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({key: weights[key].contiguous() for key in keys}, os.path.join(sharded, shard))
    weight_map = {key: shard for shard, keys in halves.items() for key in keys}
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    for folder in (binary, sharded):
        other_rate, state = loaded_state(folder)
        assert other_rate == rate
        assert all(torch.equal(state[name], expected[name]) for name in expected)


def rewrite_history(folder, edit):
    state_path = os.path.join(folder, "trainer_state.json")
    with open(state_path) as handle:
        state = json.load(handle)
    state["log_history"] = edit(state["log_history"])
    with open(state_path, "w") as handle:
        json.dump(state, handle)


def test_an_unlogged_step_is_refused_under_a_schedule_and_read_under_a_constant_rate(trained, tmp_path):
    folder, _ = copy_as(trained, tmp_path, "unlogged")
    rewrite_history(folder, lambda history: [entry for entry in history if entry.get("step") != 6])
    # a linear schedule: the rate at step 6 is not known (the scheduler's is step 7's)
    with pytest.raises(ValueError, match=r"logs no learning rate at step 6 .* the rates it logs at other steps "
                                         r"differ .* `logging_steps` dividing `save_steps`"):
        loaded_state(folder)
    rewrite_history(folder, lambda history: [{**entry, "learning_rate": 2e-4} if "learning_rate" in entry else entry
                                             for entry in history])
    assert loaded_state(folder)[0] == 2e-4  # a constant rate is every step's
    os.remove(os.path.join(folder, "trainer_state.json"))
    with pytest.raises(ValueError, match=r"has no trainer_state.json, which holds the learning rate"):
        loaded_state(folder)


def test_tied_weights_that_safetensors_left_out_are_filled_in(tmp_path):
    """A masked LM ties its decoder to the word embeddings; save_pretrained stores the tensor once."""
    from transformers import BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=16, max_position_embeddings=16, tie_word_embeddings=True)
    torch.manual_seed(1)
    saved = BertForMaskedLM(config)
    folder = str(tmp_path / "checkpoint-1")
    saved.save_pretrained(folder)
    stored = load_file(os.path.join(folder, "model.safetensors"))
    assert len(stored) < len(saved.state_dict())  # a tied key was left out
    with open(os.path.join(folder, "trainer_state.json"), "w") as handle:
        json.dump({"global_step": 1, "log_history": [{"step": 1, "learning_rate": 1e-3}]}, handle)
    torch.manual_seed(2)
    for fresh in (BertForMaskedLM(config), HuggingFaceClassifier(BertForMaskedLM(config))):
        assert load_checkpoint(fresh, folder) == 1e-3
        inner = fresh.model if isinstance(fresh, HuggingFaceClassifier) else fresh
        for name, tensor in saved.state_dict().items():
            assert torch.equal(inner.state_dict()[name], tensor), name
        assert inner.cls.predictions.decoder.weight is inner.bert.embeddings.word_embeddings.weight


def test_one_checkpoint_folder_given_as_a_string_is_one_checkpoint(trained):
    data = Sentences()
    train = TensorDataset(data.ids, torch.ones(N, LENGTH, dtype=torch.long), data.labels)
    folder = trainer_checkpoints(trained)[-1]
    tracin = TracInWE(HuggingFaceClassifier(tiny_bert()).eval(), train, folder, batch_size=4)
    assert tracin.checkpoints == [folder]


def test_a_folder_without_weights_is_refused(trained, tmp_path):
    folder, _ = copy_as(trained, tmp_path, "empty")
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(ValueError, match=r"holds no model weights \(model.safetensors, pytorch_model.bin"):
        loaded_state(folder)


def test_pickled_code_in_pytorch_model_bin_is_not_run(trained, tmp_path):
    folder, weights = copy_as(trained, tmp_path, "unsafe")
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save({"weights": weights, "code": nn.Linear(1, 1)}, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"Cannot load checkpoint .* with torch.load\(weights_only=True\)"):
        loaded_state(folder)


def test_tracin_we_reads_a_trainer_output_dir(trained, tmp_path):
    """The output dir as `checkpoints` gives the scores of the same weights and rates saved as files."""
    data = Sentences()
    train = TensorDataset(data.ids, torch.ones(N, LENGTH, dtype=torch.long), data.labels)
    model = HuggingFaceClassifier(tiny_bert()).eval()
    loss = nn.CrossEntropyLoss(reduction="sum")
    from_folders = TracInWE(model, train, trained, loss_fn=loss, batch_size=4)
    assert from_folders.checkpoints == trainer_checkpoints(trained)
    scores = from_folders.influence(train[:3])
    files = []
    for c, folder in enumerate(trainer_checkpoints(trained)):
        rate = load_checkpoint(model, folder)
        files.append(str(tmp_path / f"c{c}.pt"))
        save_checkpoint(model, files[-1], learning_rate=rate)
    assert_close(TracInWE(model, train, files, loss_fn=loss, batch_size=4).influence(train[:3]), scores, rtol=1e-6)
    assert scores.abs().max() > 0
