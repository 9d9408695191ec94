"""`cnnlab serve`: a trained model behind HTTP, for images posted one by one or many at a time.

The data flows through one module per step:

- `backends.py` loads the model once, from a run, a checkpoint or an exported
  model.onnx, as ONNX Runtime (the default) or PyTorch's fast forward: x (N, C, H, W)
  float32 normalized -> (N, K) logits, with the ModelInfo it was trained with.
- `app.py` is the FastAPI application (`create_app(backend, settings)`): it reads
  each request body with a byte limit, decodes and frames images with
  `cnnlab.data.images` (the code path `cnnlab predict` uses), and answers with the
  top classes and the model's out-of-distribution flag.
- `batcher.py` gathers concurrent requests into one batch (a short window, a
  maximum size) and runs it in one worker thread, off the event loop, so that
  /healthz answers while the model works and a full queue answers 503 at once.
- `metrics.py` keeps the Prometheus metrics of one app (requests, latency, batch
  sizes, predictions, rejected inputs, and the drift of inputs and of the class mix);
  `requestlog.py` writes the JSON-lines request log.
- `server.py` binds the socket and runs uvicorn, which drains in-flight requests
  on SIGTERM before the batcher stops; with `--workers N`, N worker processes
  each run the whole app on the one socket, and the metrics add them up.

`page.html` is the page served at `/`.
"""
