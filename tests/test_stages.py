"""The classification stage of a run (--classify, --stack: saekit.classify.classify, written by
saekit.run.write_classification) and `saekit classify`, on real MNIST."""

import json

import numpy as np
import pytest
import torch
from conftest import find_mnist_dir, make_model

from saekit.classify import ClassifyConfig, classify
from saekit.cli import main
from saekit.data import DataConfig
from saekit.data.idx import load_digits
from saekit.errors import UserError
from saekit.run import RunFolder, load_classifier, load_model, write_classification

# From the data README: training images of each digit 0-4.
TRAIN_COUNTS_0_TO_4 = [5923, 6742, 5958, 6131, 5842]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    data_dir = find_mnist_dir()
    run = tmp_path_factory.mktemp("runs") / "mnist"
    code = main(
        [
            "train",
            "--preset",
            "ufldl-mnist",
            "--data-dir",
            str(data_dir),
            "--n-examples",
            "300",
            "--n-hidden",
            "16",
            "--max-iter",
            "5",
            "--stack",
            "8",
            "--classify",
            "fine-tune",
            "--softmax-max-iter",
            "10",
            "--finetune-max-iter",
            "3",
            "--out",
            str(run),
            "--no-progress",
        ]
    )
    assert code == 0
    return run, data_dir


def check_result(result: dict, n_test: int):
    cm = np.array(result["confusion_matrix"])
    assert cm.sum() == result["n_examples"] == n_test
    assert result["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    recall = np.diag(cm) / cm.sum(1)
    assert list(result["per_class_accuracy"].values()) == pytest.approx(recall.tolist())


@pytest.mark.slow  # trains on MNIST
def test_train_with_stack_and_fine_tuning_writes_results(trained_run):
    run, _ = trained_run
    layer2 = RunFolder(run).load_model("layer2.safetensors")
    assert (layer2.n_inputs, layer2.n_hidden) == (16, 8)
    result = json.loads((run / "classification.json").read_text())
    check_result(result["softmax"], 10000)
    check_result(result["fine_tuned"], 10000)
    assert result["accuracy"] == result["fine_tuned"]["accuracy"]
    assert result["accuracy_before_fine_tuning"] == result["softmax"]["accuracy"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] == result["accuracy"]
    assert (run / "confusion.png").is_file() and (run / "confusion_fine_tuned.png").is_file()


@pytest.mark.slow  # trains on MNIST
def test_saved_classifier_predicts_the_reported_accuracy(trained_run):
    run, data_dir = trained_run
    model, class_names = load_classifier(run)
    assert class_names == [str(d) for d in range(10)] and len(model.encoders) == 2
    x_test, y_test = load_digits("mnist", "test", data_dir)
    accuracy = float(np.mean(model.predict(x_test) == y_test))
    assert accuracy == json.loads((run / "classification.json").read_text())["accuracy"]


def test_damaged_classifier_file_is_a_user_error(tmp_path):
    (tmp_path / "classifier.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="corrupt or not a saekit classifier"):
        load_classifier(tmp_path)
    with pytest.raises(UserError, match="--classify"):
        load_classifier(tmp_path / "nothing")


@pytest.mark.slow  # trains on MNIST
def test_fine_tuning_decays_the_encoders_only_when_asked(tmp_path):
    data_dir = find_mnist_dir()
    norms = {}
    for flag in ("--finetune-decay-encoders", "--no-finetune-decay-encoders"):
        run = tmp_path / flag
        assert (
            main(
                [
                    "train",
                    "--preset",
                    "ufldl-mnist",
                    "--data-dir",
                    str(data_dir),
                    "--n-examples",
                    "200",
                    "--n-hidden",
                    "12",
                    "--max-iter",
                    "5",
                    "--classify",
                    "fine-tune",
                    "--softmax-max-iter",
                    "5",
                    "--finetune-max-iter",
                    "20",
                    "--finetune-weight-decay",
                    "1",
                    flag,
                    "--out",
                    str(run),
                    "--no-progress",
                ]
            )
            == 0
        )
        norms[flag] = float(load_classifier(run)[0].encoders[0].W1.detach().norm())
    pretrained = float(load_model(run).W1.detach().norm())
    # A strong decay on W1 shrinks it well below the pre-trained weights; without it W1 barely moves.
    assert norms["--finetune-decay-encoders"] < 0.8 * pretrained
    assert norms["--no-finetune-decay-encoders"] == pytest.approx(pretrained, rel=0.2)


@pytest.mark.slow  # trains on MNIST
def test_classify_self_taught_protocol(trained_run, capsys):
    run, _ = trained_run
    assert main(["classify", str(run), "--protocol", "self-taught", "--softmax-max-iter", "5", "--no-progress"]) == 0
    result = json.loads((run / "classification.json").read_text())
    n_labelled = sum(TRAIN_COUNTS_0_TO_4)
    n_test = n_labelled - (n_labelled + 1) // 2  # the second half of the labelled digits
    check_result(result["features"], n_test)
    check_result(result["raw_pixels"], n_test)
    assert set(result["features"]["per_class_accuracy"]) == {"0", "1", "2", "3", "4"}
    assert "accuracy_raw_pixels" in capsys.readouterr().out


@pytest.mark.slow  # trains on MNIST
def test_classify_takes_classifier_settings_and_records_them(trained_run):
    run, _ = trained_run
    assert (
        main(["classify", str(run), "--softmax-max-iter", "2", "--softmax-weight-decay", "0.5", "--no-progress"]) == 0
    )
    settings = json.loads((run / "classification.json").read_text())["settings"]
    assert settings["softmax_max_iter"] == 2 and settings["softmax_weight_decay"] == 0.5
    assert load_classifier(run)[0].softmax.weight_decay == 0.5


@pytest.mark.slow  # trains on MNIST
def test_classify_rejects_bad_settings_and_non_run_folders(trained_run, tmp_path, capsys):
    run, _ = trained_run
    assert main(["classify", str(run), "--softmax-weight-decay", "-1", "--no-progress"]) == 2
    assert "--softmax-weight-decay must be a number >= 0" in capsys.readouterr().err
    assert main(["classify", str(tmp_path)]) == 2
    assert "not a saekit run folder" in capsys.readouterr().err


def test_classify_needs_labelled_data(tmp_path, capsys):
    code = main(["train", "--classify", "softmax", "--max-iter", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == 2
    assert "--classify needs labelled data" in capsys.readouterr().err


@pytest.mark.slow  # MNIST's training and test sets
def test_classify_returns_what_write_classification_writes(tmp_path):
    data_dir = find_mnist_dir()
    images, labels = load_digits("mnist", "train", data_dir)
    x, y = torch.as_tensor(images[:200], dtype=torch.float64), torch.as_tensor(labels[:200])
    data = DataConfig(data="mnist", data_dir=str(data_dir), n_examples=200)
    encoder = make_model(784, 10, seed=0)
    classification = classify(
        [encoder], ClassifyConfig(classify="softmax", softmax_max_iter=5), data, x, y, progress=False
    )
    assert classification.class_names == [str(d) for d in range(10)]
    check_result(classification.result["softmax"], 10000)
    x_test, y_test = load_digits("mnist", "test", data_dir)
    assert classification.result["accuracy"] == float(np.mean(classification.model.predict(x_test) == y_test))
    assert classification.result["settings"]["softmax_max_iter"] == 5
    assert [c.name for c in classification.confusions] == ["confusion"]

    reported = write_classification(RunFolder(tmp_path), classification)
    assert reported == {"accuracy": classification.result["accuracy"]}
    assert json.loads((tmp_path / "classification.json").read_text()) == classification.result
    assert (tmp_path / "confusion.png").is_file()
    model, class_names = load_classifier(tmp_path)
    assert class_names == classification.class_names
    assert torch.equal(model.softmax.theta, classification.model.softmax.theta)
    assert torch.equal(model.encoders[0].W1, encoder.W1)  # softmax only: the encoder is unchanged
