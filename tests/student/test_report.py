"""The evaluation pictures: what `predictions.png` shows and labels."""

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from stages.student.report import colourise, predictions_figure, predictions_grid

PALETTE = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]
CLASSES = ["road", "car", "sky", "wall"]


def examples():
    rng = np.random.default_rng(0)
    label_a = np.zeros((40, 48), np.int64)
    label_a[:10] = 2
    label_a[-3:] = 255  # unlabelled pixels
    pred_a = np.ones((40, 48), np.int64)
    label_b = np.full((40, 48), 2, np.int64)
    pred_b = np.full((40, 48), 2, np.int64)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return [
        {"id": "cloud/val/MAP_10_point136_motionblur/000500", "condition": "cloud",
         "case": "motionblur", "rgb": image, "depth": image[..., ::-1], "label": label_a,
         "pred": pred_a},
        {"id": "scene_7", "condition": None, "case": None, "rgb": image, "depth": image,
         "label": label_b, "pred": pred_b},
    ]


def test_columns_rows_and_legend_say_what_is_drawn():
    ex = examples()
    fig = predictions_figure(ex, ["rgb", "depth"], PALETTE, CLASSES)
    axes = np.asarray(fig.axes).reshape(2, 4)
    assert [ax.get_title() for ax in axes[0]] == ["rgb", "depth", "ground truth", "prediction"]
    assert all(ax.get_title() == "" for ax in axes[1])
    first, second = (ax.get_ylabel() for ax in axes[:, 0])
    assert first.replace("\n", "") == "cloud/val/MAP_10_point136_motionblur/000500" \
        "[cloud / motionblur]"
    assert second == "scene_7\n[no condition]"
    # the tiles are the inputs and the palette-coloured label and prediction of each row
    np.testing.assert_array_equal(axes[0, 1].images[0].get_array(), ex[0]["depth"])
    np.testing.assert_array_equal(axes[0, 2].images[0].get_array(),
                                  colourise(ex[0]["label"], PALETTE))
    np.testing.assert_array_equal(axes[1, 3].images[0].get_array(),
                                  colourise(ex[1]["pred"], PALETTE))
    # the legend: exactly the classes in the drawn labels and predictions, in their colours
    (legend,) = fig.legends
    names = [t.get_text() for t in legend.get_texts()]
    assert names == ["road", "car", "sky", "ignore (255)"]  # not "wall": nowhere drawn
    colours = [tuple(np.round(np.asarray(h.get_facecolor()[:3]) * 255).astype(int))
               for h in legend.legend_handles]
    assert colours == [PALETTE[0], PALETTE[1], PALETTE[2], (0, 0, 0)]
    plt.close(fig)


def test_grid_is_written_as_a_png(tmp_path):
    path = predictions_grid(examples(), ["rgb", "depth"], PALETTE, CLASSES,
                            tmp_path / "predictions.png")
    with Image.open(path) as image:
        width, height = image.size
    assert image.format == "PNG" and width > height > 2 * 40


def test_zero_iou_and_absent_classes_are_drawn_differently(tmp_path):
    """A class scored 0 gets a red marker; an absent one (NaN) a grey stub, no marker."""
    import numpy as np
    from PIL import Image

    from stages.student.report import per_class_chart, sensor_chart

    def red_pixels(path):
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 60)).sum())

    zero = per_class_chart({"road": 50.0, "car": 0.0}, tmp_path / "zero.png", "protocol x")
    absent = per_class_chart({"road": 50.0, "car": float("nan")}, tmp_path / "absent.png")
    assert red_pixels(zero) > 20 and red_pixels(absent) == 0
    assert not np.array_equal(np.asarray(Image.open(zero)), np.asarray(Image.open(absent)))
    chart = sensor_chart({"fog": 40.0, "night": 20.0}, {"fog": 4, "night": 2},
                         tmp_path / "sensor.png", "protocol native")
    assert Image.open(chart).size[0] > 300
