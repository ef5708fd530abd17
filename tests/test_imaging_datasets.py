"""The image loaders (hsv1_cells, embryo_movie) on the real files, and the SIMULATED time-lapse wells (simulate_timelapse_wells)."""
import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

from cellmtl import datasets
from cellmtl.datasets import (EMBRYO_FILES, HSV1_CHANNELS, HSV1_FILES, REGISTRY, DatasetChecksumError, embryo_movie, hsv1_cells,
                              read_hsv1_tiff, simulate_timelapse_wells)

# What SOURCES.md and the authors' PLA.txt say, written out here so that the tests do not take it from the module.
LUT_RGB = {"DAPI": (0, 0, 255), "ICP4": (0, 255, 255), "PLA": (255, 255, 0), "Mito": (255, 0, 255)}  # blue, cyan, yellow, magenta
ORDER_IN_FILE = {"PLA_NI": ("Mito", "PLA", "DAPI", "ICP4"), "PLA_4hpi": ("Mito", "PLA", "DAPI", "ICP4"), "PLA_8hpi": ("Mito", "PLA", "DAPI", "ICP4"),
                 "PLA_12hpi": ("DAPI", "ICP4", "PLA", "Mito"), "CTRL_Neg": ("DAPI", "ICP4", "PLA", "Mito"),
                 "CTRL_RMDN3": ("DAPI", "ICP4", "PLA", "Mito"), "CTRL_VAPB": ("DAPI", "ICP4", "PLA", "Mito")}
MANIFEST_COLUMNS = ["path", "infected", "infection_onset_hour", "frames_per_hour", "group", "simulated"]


@pytest.fixture(scope="module")
def hsv1(data_dir): return hsv1_cells(data_dir)

@pytest.fixture(scope="module")
def movie(data_dir): return embryo_movie(data_dir)

@pytest.fixture(scope="module")
def wells(tmp_path_factory):
    "The default simulation (16 wells x 24 frames x 64 px), written once."
    return simulate_timelapse_wells(tmp_path_factory.mktemp("wells") / "default")


def _otsu(values):
    p = np.bincount(values.ravel(), minlength=256) / values.size
    weight, mean = np.cumsum(p), np.cumsum(p * np.arange(256))
    return int(np.argmax((mean[-1] * weight - mean) ** 2 / np.maximum(weight * (1 - weight), 1e-12)))


def _reporter_score(frame):
    "Mean channel-1 signal over the cells (brightest 30 % of channel 0) minus the median elsewhere."
    frame = frame.astype(float)
    cells = frame[0] > np.percentile(frame[0], 70)
    return frame[1][cells].mean() - np.median(frame[1][~cells])


# ---- hsv1_cells ----

def test_hsv1_registry_matches_the_mirror(data_dir):
    mirrored = {}
    for line in (data_dir / "SHA256SUMS").read_text().splitlines():
        sha, size, path = line.split(maxsplit=2)  # paths hold spaces
        mirrored[path] = (sha, int(size))
    registered = [p for p in REGISTRY if p.startswith("hsv1/")]
    assert sorted(registered) == sorted([f[3] for f in HSV1_FILES.values()] + ["hsv1/Figure 4/PLA/PLA.txt"])
    for path in registered:
        assert (REGISTRY[path].sha256, REGISTRY[path].size) == mirrored[path]
        assert REGISTRY[path].dataset == "hsv1_cells" and " " not in REGISTRY[path].url
        assert REGISTRY[path].url.startswith("https://raw.githubusercontent.com/leclercsimon74/2024_mito-HSV_paper/587f9b8361c2137f440b169a58d93d5770d81e34/")


def test_hsv1_channels_follow_the_luts(hsv1, data_dir):
    assert hsv1.index.tolist() == list(ORDER_IN_FILE)
    for cell, row in hsv1.iterrows():
        with tifffile.TiffFile(data_dir / row["file"]) as tif:
            raw, luts = tif.asarray(), tif.imagej_metadata["LUTs"]
        colours = [tuple(int(v) for v in np.asarray(lut)[:, 255]) for lut in luts]
        assert row["channel_order_in_file"] == ORDER_IN_FILE[cell]
        for c, name in enumerate(HSV1_CHANNELS):  # canonical plane c is the raw plane whose LUT has that channel's colour
            assert np.array_equal(row["image"][c], raw[colours.index(LUT_RGB[name])]), (cell, name)
        assert row["image"].shape == raw.shape and row["image"].dtype == np.uint8


def test_hsv1_display_ranges_agree(hsv1, data_dir):
    "PLA.txt: ICP4 and PLA share a fixed display range (77-255, 72-255) in every cell, DAPI and Mito are set per cell; the files' Ranges agree."
    fixed_icp4 = 0
    for cell, row in hsv1.iterrows():
        ranges = np.asarray(tifffile.TiffFile(data_dir / row["file"]).imagej_metadata["Ranges"]).reshape(4, 2)  # (low, high) per raw plane
        fixed = {name for name, (low, high) in zip(row["channel_order_in_file"], ranges) if 72 <= low <= 77 and high == 255}
        assert fixed == {"ICP4", "PLA"}, (cell, ranges)
        fixed_icp4 += tuple(ranges[row["channel_order_in_file"].index("ICP4")]) == (77, 255)
    assert fixed_icp4 == 6  # all but the VAPB control, whose ICP4 is shown at 72-255


def test_hsv1_dapi_is_the_large_smooth_structure(hsv1):
    "Independent of the metadata: the nucleus is one large blob, so DAPI keeps the most of its variance under an 8 px blur."
    for cell, image in hsv1["image"].items():
        inside = image.any(axis=0)
        kept = [ndimage.gaussian_filter(p.astype(np.float32), 8)[inside].var() / p.astype(np.float32)[inside].var() for p in image]
        assert int(np.argmax(kept)) == HSV1_CHANNELS.index("DAPI"), (cell, np.round(kept, 2))


def test_hsv1_icp4_is_nuclear_in_infected_cells_only(hsv1):
    "EYFP-ICP4 (a nuclear protein) is brighter in the nucleus than in the cytoplasm of infected cells; the raw channel mean is not higher."
    enrichment = {}
    for cell, image in hsv1["image"].items():
        inside = image.any(axis=0)
        nucleus = inside & (image[0] > _otsu(image[0][inside]))
        icp4 = image[HSV1_CHANNELS.index("ICP4")].astype(float)
        enrichment[cell] = icp4[nucleus].mean() - icp4[inside & ~nucleus].mean()
    enrichment = pd.Series(enrichment)
    assert enrichment[hsv1["infected"]].min() > 10  # observed 16.5 (4 hpi), 31.4 (8 hpi), 42.3 (12 hpi)
    assert enrichment[~hsv1["infected"]].abs().max() < 5  # observed -2.9 (NI) to -0.1
    mean_icp4 = {c: im[1][im.any(axis=0)].mean() for c, im in hsv1["image"].items()}
    assert mean_icp4["PLA_NI"] > mean_icp4["PLA_4hpi"]  # why the loader's users should not threshold the raw mean


def test_hsv1_table_and_caveats(hsv1):
    assert hsv1["condition"].astype(str).tolist() == ["NI", "4hpi", "8hpi", "12hpi", "NI", "NI", "NI"]
    assert hsv1["infected"].dtype == bool and hsv1["infected"].tolist() == [False, True, True, True, False, False, False]
    assert hsv1["hours_post_infection"].isna().tolist() == (~hsv1["infected"]).tolist()
    assert hsv1.loc[hsv1["infected"], "hours_post_infection"].tolist() == [4.0, 8.0, 12.0]
    assert np.allclose(hsv1["pixel_size_um"], 0.0632473, atol=1e-6)
    assert hsv1.groupby("acquisition_date").size().to_dict() == {"2023-09-07": 1, "2023-09-08": 2, "2023-09-11": 1, "2023-09-12": 3}
    source = hsv1.attrs["cellmtl_source"]
    assert source["simulated"] is False and source["channels"] == list(HSV1_CHANNELS)
    assert "n = 1 cell per condition" in source["caveats"] and "confounded" in source["caveats"]
    assert "DAPI\t\t\tBLUE" in source["protocol"]  # PLA.txt, registered and read
    assert "n = 1" in hsv1_cells.__doc__ and "confounded" in hsv1_cells.__doc__


def _composite(path, luts, with_luts=True):
    "A SYNTHETIC (4, 8, 8) uint8 ImageJ composite with the given LUTs (test input only)."
    image = np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8)
    metadata = {"axes": "CYX", "mode": "composite", "unit": "micron", **({"LUTs": luts} if with_luts else {})}
    tifffile.imwrite(path, image, imagej=True, resolution=(10.0, 10.0), metadata=metadata)
    return image


def test_read_hsv1_tiff_needs_luts_that_name_the_channels(tmp_path):
    ramp = np.arange(256)
    lut = {name: np.stack([ramp * c // 255 for c in rgb]).astype(np.uint8) for name, rgb in LUT_RGB.items()}
    grey = np.stack([ramp] * 3).astype(np.uint8)
    image = _composite(tmp_path / "good.tif", [lut["PLA"], lut["DAPI"], lut["Mito"], lut["ICP4"]])
    canonical, info = read_hsv1_tiff(tmp_path / "good.tif")
    assert info["channel_order_in_file"] == ("PLA", "DAPI", "Mito", "ICP4")
    assert np.array_equal(canonical, image[[1, 3, 0, 2]]) and np.isclose(info["pixel_size_um"], 0.1)
    _composite(tmp_path / "grey.tif", [lut["PLA"], lut["DAPI"], lut["Mito"], grey])
    with pytest.raises(ValueError, match=r"grey.tif: its ImageJ LUTs are \['yellow', 'blue', 'magenta', 'grey'\].*Lookup Tables"):
        read_hsv1_tiff(tmp_path / "grey.tif")
    _composite(tmp_path / "twice.tif", [lut["PLA"], lut["PLA"], lut["Mito"], lut["ICP4"]])
    with pytest.raises(ValueError, match="once each"):
        read_hsv1_tiff(tmp_path / "twice.tif")
    _composite(tmp_path / "none.tif", None, with_luts=False)
    with pytest.raises(ValueError, match="has no ImageJ LUTs"):
        read_hsv1_tiff(tmp_path / "none.tif")


def _mirror_with_one_corrupt(tmp_path, data_dir, paths, corrupt):
    "A mirror of symbolic links to the real files, except `corrupt`: a copy with its last byte flipped."
    for path in paths:
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if path == corrupt:
            data = bytearray((data_dir / path).read_bytes()); data[-1] ^= 0xFF; target.write_bytes(bytes(data))
        else:
            target.symlink_to(data_dir / path)
    return tmp_path


def test_hsv1_corrupt_copy_is_an_error(tmp_path, data_dir):
    corrupt = HSV1_FILES["PLA_8hpi"][3]
    mirror = _mirror_with_one_corrupt(tmp_path, data_dir, [p for p in REGISTRY if p.startswith("hsv1/")], corrupt)
    with pytest.raises(DatasetChecksumError, match="Checksum mismatch for .*8hpi.*" + REGISTRY[corrupt].sha256):
        hsv1_cells(mirror)


# ---- embryo_movie ----

def test_embryo_registry_matches_the_mirror(data_dir):
    mirrored = {p: sha for sha, _, p in (l.split(maxsplit=2) for l in (data_dir / "SHA256SUMS").read_text().splitlines())}
    assert len(EMBRYO_FILES) == 63 and all(REGISTRY[p].sha256 == mirrored[p] for p in EMBRYO_FILES)
    assert {REGISTRY[p].dataset for p in EMBRYO_FILES} == {"cellprofiler_track_objects"}
    assert REGISTRY[EMBRYO_FILES[21]].url.endswith("/ExampleTrackObjects/images/Sequence2/DrosophilaEmbryo_GFPHistone_0000.tif")
    assert len({mirrored[p] for p in EMBRYO_FILES}) == 43  # the files' own checksums agree: 43 distinct files


def test_embryo_43_distinct_frames_in_time_order(movie, data_dir):
    frames, table = movie
    assert frames.shape == (43, 264, 542) and frames.dtype == np.uint8 and len(table) == 43
    assert len({hashlib.sha256(f.tobytes()).hexdigest() for f in frames}) == 43  # no two identical
    times = table["time_s"].to_numpy()
    assert (np.diff(times) > 0).all() and times[0] == 0 and times[-1] == 434
    assert (times == 7.0 * table["movie_position"]).all()
    assert table["n_files"].sum() == 63 and sorted(f for files in table["files"] for f in files) == sorted(EMBRYO_FILES)
    positions = {p: i for i, p in enumerate(EMBRYO_FILES)}
    for _, row in table.iterrows():  # a frame's files are consecutive, its first file is where its time comes from
        assert [positions[f] for f in row["files"]] == list(range(row["movie_position"], row["movie_position"] + row["n_files"]))
        assert EMBRYO_FILES[row["movie_position"]] == row["files"][0]
        assert row["sequence"] == row["movie_position"] // 21 + 1 and row["index_in_sequence"] == row["movie_position"] % 21
    for frame in (0, 14, 15, 42):  # each frame is its first file's green plane
        assert np.array_equal(frames[frame], tifffile.imread(data_dir / table.loc[frame, "files"][0])[..., 1])
    assert table.loc[14, "files"] == (EMBRYO_FILES[20], EMBRYO_FILES[21])  # Sequence1 20 = Sequence2 0, one frame held
    assert table.loc[15, "time_s"] - table.loc[14, "time_s"] == 14.0


def test_embryo_time_rule_matches_the_images(movie):
    "Steps the rule makes 14 s long (across a repeat) change the image more than the 7 s steps on either side."
    frames, table = movie
    blurred = np.stack([ndimage.gaussian_filter(f.astype(np.float32), 2) for f in frames])
    change = np.abs(np.diff(blurred, axis=0)).mean(axis=(1, 2))  # (42,)
    held = np.flatnonzero(table["interval_s"].to_numpy()[1:] == 14)
    assert len(held) == 20
    assert all(change[i] > max(change[i - 1], change[i + 1]) for i in held)


def test_embryo_rgb_and_corrupt_copy(tmp_path, data_dir):
    corrupt = EMBRYO_FILES[30]
    mirror = _mirror_with_one_corrupt(tmp_path, data_dir, EMBRYO_FILES, corrupt)
    with pytest.raises(DatasetChecksumError, match="Sequence2/DrosophilaEmbryo_GFPHistone_0009.tif"):
        embryo_movie(mirror)
    (mirror / corrupt).unlink(); (mirror / corrupt).symlink_to(data_dir / corrupt)
    frames, table = embryo_movie(mirror, rgb=True)
    assert frames.shape == (43, 264, 542, 3) and "RGB" in table.attrs["cellmtl_source"]["frames"]


# ---- simulate_timelapse_wells (SIMULATED) ----

def test_simulation_is_fast_and_deterministic(tmp_path, wells):
    import time
    start = time.perf_counter(); again = simulate_timelapse_wells(tmp_path / "again"); seconds = time.perf_counter() - start
    assert seconds < 3.0  # about 0.3 s on one core
    names = sorted(p.name for p in wells.parent.iterdir())
    assert names == sorted(p.name for p in again.parent.iterdir()) and len(names) == 18
    assert all((wells.parent / n).read_bytes() == (again.parent / n).read_bytes() for n in names)  # same seed, same bytes
    other = simulate_timelapse_wells(tmp_path / "other", seed=1)
    assert (wells.parent / "well_00.tif").read_bytes() != (other.parent / "well_00.tif").read_bytes()


def test_manifest_and_files_say_simulated(tmp_path):
    path = simulate_timelapse_wells(tmp_path / "w", n_wells=5, n_frames=10, frames_per_hour=2.0, image_size=48,
                                    infected_fraction=0.4, onset_hours=(1.0, 3.0), seed=3)
    manifest = pd.read_csv(path)
    assert manifest.columns.tolist() == MANIFEST_COLUMNS and len(manifest) == 5
    assert manifest["infected"].dtype == bool and manifest["simulated"].dtype == bool and manifest["simulated"].all()
    assert manifest["infected"].sum() == 2 and manifest["group"].is_unique and (manifest["frames_per_hour"] == 2.0).all()
    assert manifest["infection_onset_hour"].isna().tolist() == (~manifest["infected"]).tolist()
    onsets = manifest["infection_onset_hour"].dropna()
    assert onsets.between(1.0, 3.0).all() and (onsets <= (10 - 1) / 2.0).all()  # inside the movie
    assert ",False,," in path.read_text()  # a mock well's onset is empty
    for _, row in manifest.iterrows():
        with tifffile.TiffFile(path.parent / row["path"]) as tif:
            assert tif.series[0].axes == "TCYX" and tif.asarray().shape == (10, 2, 48, 48) and tif.asarray().dtype == np.uint8
            assert tif.imagej_metadata["Info"].startswith("SIMULATED")
    readme = (path.parent / "README.txt").read_text()
    assert readme.startswith("SIMULATED DATA") and "seed=3" in readme
    assert "SIMULATED" in simulate_timelapse_wells.__doc__


def test_onsets_fall_inside_the_movie():
    with pytest.raises(ValueError, match="every onset must fall inside the movie"):
        simulate_timelapse_wells("/nonexistent/never-written", n_frames=6, onset_hours=(2.0, 8.0))
    with pytest.raises(ValueError, match=r"infected_fraction must be in \[0, 1\]"):
        simulate_timelapse_wells("/nonexistent/never-written", infected_fraction=-0.1)
    with pytest.raises(ValueError, match="cells_per_well"):
        simulate_timelapse_wells("/nonexistent/never-written", cells_per_well=(0, 5))


def test_reporter_rises_after_onset_in_infected_wells_only(wells):
    manifest = pd.read_csv(wells)
    hours = np.arange(24) / manifest["frames_per_hour"][0]
    for _, row in manifest.iterrows():
        scores = np.array([_reporter_score(f) for f in tifffile.imread(wells.parent / row["path"])])  # (T,)
        if row["infected"]:
            onset = row["infection_onset_hour"]
            before, late = scores[hours <= onset], scores[hours >= onset + 4]
            assert before.max() < 13, (row["group"], np.round(scores, 1))  # until the onset, like a mock well
            assert late.min() > 13 and late.mean() - before.mean() > 15, (row["group"], np.round(scores, 1))
        else:  # mock: autofluorescence (0.04 x 255 = 10 grey levels) and noise, no reporter
            assert scores.max() < 13, (row["group"], np.round(scores, 1))


def test_mock_wells_grow_denser(wells):
    manifest = pd.read_csv(wells)
    for path in manifest.loc[~manifest["infected"], "path"]:
        bodies = tifffile.imread(wells.parent / path)[:, 0].astype(float)  # (T, H, W)
        assert bodies[-3:].mean() > 1.1 * bodies[:3].mean(), path  # cells divide (doubling time 16 h)


def test_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"is not empty \(1 entries, e.g. \['mine.txt'\]\).*overwrite=True"):
        simulate_timelapse_wells(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # nothing written
    manifest = simulate_timelapse_wells(tmp_path, n_wells=2, n_frames=3, onset_hours=(0.0, 2.0), overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me" and manifest.exists()
    with pytest.raises(NotADirectoryError):
        simulate_timelapse_wells(tmp_path / "mine.txt")
