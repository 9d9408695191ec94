"""The seed tutorial's model server as a tutorial writes it: server (a) of bench/serve.py.

Flask, one image per request: the upload is decoded with PIL, transformed by hand
as torchvision's ToTensor and Normalize would (/255, then (x - mean) / std), run
through the eager model under torch.no_grad, and answered as JSON. Flask's own
threaded server (`app.run(threaded=True)`): a thread per connection, every request
logged by werkzeug, torch with its default threads. Only the loading is cnnlab's,
so that both servers of the bench run the same weights with the same normalization.

    python bench/seed_serve.py RUN_OR_CHECKPOINT [--port 5000]

POST /predict with the image as multipart field `file` -> {"class": "7", "probability": 0.98}
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flask import Flask, jsonify, request
from PIL import Image

from cnnlab.train.checkpoint import load_checkpoint, resolve_checkpoint_path

app = Flask(__name__)

# Set once at start-up by load(), as a tutorial's module-level globals.
model = None
classes: tuple[str, ...] = ()
mode = "L"  # PIL mode of the model's input: "L" for one channel, "RGB" for three
mean = std = np.zeros((1, 1, 1), dtype=np.float32)  # (C, 1, 1), on the 0..1 scale


def load(path: Path) -> None:
    global model, classes, mode, mean, std
    checkpoint = load_checkpoint(resolve_checkpoint_path(path))
    model = checkpoint.build_model()  # eval mode, CPU
    classes = checkpoint.classes
    mode = "L" if checkpoint.in_shape[0] == 1 else "RGB"
    mean = np.array(checkpoint.normalization.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.array(checkpoint.normalization.std, dtype=np.float32).reshape(-1, 1, 1)


def transform(image: Image.Image) -> torch.Tensor:
    """PIL image -> (C, H, W) float32 normalized: ToTensor, then Normalize."""
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C), 0..1
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return torch.from_numpy((x - mean) / std)


@app.route("/predict", methods=["POST"])
def predict():
    if "file" not in request.files:
        return jsonify({"error": "send the image as multipart field 'file'"}), 400
    image = Image.open(io.BytesIO(request.files["file"].read())).convert(mode)
    x = transform(image).unsqueeze(0)  # (1, C, H, W)
    with torch.no_grad():
        outputs = model(x)
    probabilities = F.softmax(outputs, dim=1)[0]
    index = int(probabilities.argmax())
    return jsonify({"class": classes[index], "probability": float(probabilities[index])})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the seed tutorial's Flask model server")
    parser.add_argument("model", type=Path, help="a cnnlab run directory or checkpoint")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    load(args.model)
    app.run(host="127.0.0.1", port=args.port, threaded=True)
