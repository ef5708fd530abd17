"""The one checkpoint format: what save refuses and replaces, file modes, clear errors when loading."""
import os
import stat

import pandas as pd
import pytest
import torch
from torch import nn

import cellmtl
from cellmtl.datasets import pbmc68k_hierarchy
from cellmtl.mtl import HierarchicalAnnotator
from cellmtl.train import CheckpointError, fit, save_checkpoint

LEVELS = ["anno_lv1", "anno_lv2"]


@pytest.fixture(scope="module")
def pbmc():
    return pbmc68k_hierarchy()


@pytest.fixture(scope="module")
def annotator(pbmc):
    return HierarchicalAnnotator(label_keys=LEVELS).fit(pbmc, epochs=2, patience=None)


def test_save_refuses_an_occupied_folder_and_overwrite_replaces_all_model_files(annotator, pbmc, tmp_path):
    folder = annotator.save(tmp_path / "model")
    with pytest.raises(FileExistsError, match="already holds a saved cellmtl.HierarchicalAnnotator"):
        annotator.save(folder)
    (folder / "notes.txt").write_text("the user's")
    no_history = HierarchicalAnnotator(label_keys=LEVELS).fit(pbmc, epochs=1, patience=None)
    no_history.history_ = None  # e.g. a model rebuilt without training history
    no_history.save(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt", "notes.txt"]  # no stale history.csv
    assert cellmtl.load(folder).history_ is None


def test_save_refuses_a_foreign_model_file(annotator, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"someone else's weights")
    with pytest.raises(FileExistsError, match="model.pt of 22 bytes that no cellmtl save describes"):
        annotator.save(tmp_path)
    assert (tmp_path / "model.pt").read_bytes() == b"someone else's weights"


def test_saved_files_follow_the_umask(annotator, tmp_path):
    old = os.umask(0o027)
    try: folder = annotator.save(tmp_path / "shared")
    finally: os.umask(old)
    for name in ("model.pt", "config.json", "history.csv"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o640, name


def test_round_trip_through_cellmtl_load(annotator, pbmc, tmp_path):
    again = cellmtl.load(annotator.save(tmp_path / "model"))
    assert type(again) is HierarchicalAnnotator and again.genes_ == annotator.genes_
    pd.testing.assert_frame_equal(again.predict(pbmc), annotator.predict(pbmc))
    assert len(again.history_) == len(annotator.history_)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_loading_onto_missing_cuda_says_so_and_does_not_call_the_file_corrupt(annotator, tmp_path):
    folder = annotator.save(tmp_path / "model")
    with pytest.raises(ValueError, match="CUDA is not available") as error:
        HierarchicalAnnotator.load(folder, device="cuda")
    assert "corrupt" not in str(error.value) and "delete" not in str(error.value)
    assert cellmtl.load(folder, device="auto").model_ is not None  # "auto" picks what there is


def test_another_kind_names_its_loader(tmp_path):
    save_checkpoint(tmp_path / "model.pt", kind="cellmtl.HRCAAnnotator", config={}, genes=[], history=None)
    with pytest.raises(CheckpointError, match=r"load it with cellmtl\.hrca\.HRCAAnnotator\.load\(dir\)"):
        HierarchicalAnnotator.load(tmp_path)
    save_checkpoint(tmp_path / "model.pt", kind="cellmtl.FutureModel", config={}, genes=[], history=None)
    with pytest.raises(CheckpointError, match="does not know"):
        cellmtl.load(tmp_path)


def test_a_training_run_folder_is_not_a_saved_model(tmp_path):
    def loss(model, batch): return {"loss": model(batch).pow(2).mean()}
    fit(nn.Linear(2, 1), loss, [torch.ones(4, 2)], epochs=1, checkpoint_dir=tmp_path, tensorboard=False, monitor="train_loss")
    with pytest.raises(CheckpointError, match="holds a training run"):
        cellmtl.load(tmp_path)


def test_a_second_run_into_one_checkpoint_dir_is_refused(tmp_path):
    def loss(model, batch): return {"loss": model(batch).pow(2).mean()}
    run = dict(epochs=1, checkpoint_dir=tmp_path, monitor="train_loss")
    fit(nn.Linear(2, 1), loss, [torch.ones(4, 2)], **run)
    with pytest.raises(FileExistsError, match="resume=True to continue it, overwrite=True"):
        fit(nn.Linear(2, 1), loss, [torch.ones(4, 2)], **run)
    fit(nn.Linear(2, 1), loss, [torch.ones(4, 2)], **run, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == ["run_1", "run_2"]


def test_matrices_and_frames_are_refused_with_the_wrapping_line(annotator, pbmc):
    with pytest.raises(TypeError, match=r"ad.AnnData\(X, var=pd.DataFrame\(index=gene_names\)\)"):
        annotator.predict(pbmc.X)
    frame = pd.DataFrame(pbmc.X[:5].toarray(), index=pbmc.obs_names[:5], columns=pbmc.var_names)
    with pytest.raises(TypeError, match="var=pd.DataFrame\\(index=df.columns\\)"):
        annotator.embed(frame)


def test_score_checks_the_labels_before_predicting(annotator, pbmc):
    import anndata as ad
    with pytest.raises(KeyError, match="no label column"):
        annotator.score(ad.AnnData(pbmc.X, var=pbmc.var))
    relabelled = pbmc[:40].copy()
    relabelled.obs["anno_lv2"] = relabelled.obs["anno_lv2"].astype(object)
    relabelled.obs.iloc[:2, relabelled.obs.columns.get_loc("anno_lv2")] = "nan"
    relabelled.obs.iloc[2:5, relabelled.obs.columns.get_loc("anno_lv2")] = "platelet"
    with pytest.warns(UserWarning) as caught:
        annotator.score(relabelled)
    messages = " | ".join(str(w.message) for w in caught)
    assert "2 cells have the text label 'nan'" in messages and "3 cells carry anno_lv2 labels the model never saw" in messages
