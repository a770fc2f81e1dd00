"""Audio folders whose validation set shares files with the training set, for the tests of the
trainers' note (`model.data.shared_with_training`)."""
import os
import shutil


def val_sharing_training_files(corpus, tmp_path):
    """`tmp_path/train` (three of `corpus`'s readable training files) and `tmp_path/val` (one file of
    its own, a symlink to t0.wav and a hard link of t1.wav): (train, val) folders."""
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir()
    val.mkdir()
    files = [f for f in sorted((corpus / "train").rglob("*.wav")) if f.name != "broken.wav"][:3]
    for i, f in enumerate(files):
        shutil.copy(f, train / f"t{i}.wav")
    shutil.copy(sorted((corpus / "val").rglob("*.wav"))[0], val / "own.wav")
    (val / "linked.wav").symlink_to(train / "t0.wav")
    os.link(train / "t1.wav", val / "hard.wav")
    return train, val


def shared_note(val) -> str:
    return (f"note: val_data_path={val} shares 2 of its 3 files with train_data_path (hard.wav, linked.wav): its "
            "loss, which picks best.pt, measures how well the model fits its training data, not how it generalises")
