"""Contender (a): the seed tutorial's recipe, as it is written.

LeNet-5 defined as an nn.Module class, a per-image torch `Dataset` whose
`__getitem__` turns one uint8 image into a PIL image and then into a float
tensor in [0, 1] (what torchvision's MNIST dataset with `ToTensor()` does), a
`DataLoader` with batch size 4 and shuffling, `CrossEntropyLoss`, Adam with
its default learning rate (0.001), and the loop zero_grad -> forward -> loss
-> backward -> step, on the CPU. torchvision is not used; its two pieces are
rewritten below in the same way. The tutorial's bugs are fixed, not copied:
the classifier reads the pooled features (not the input), and the test counts
correct answers. It trains until the bench's budget runs out (the tutorial
asks for 200 epochs).

    python bench/seed_recipe.py --out result.json [--budget 300] [--dataset fashion-mnist]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset

from harness import Clock, Record, Turns, bench_splits, contender_parser, test_accuracy

BATCH_SIZE = 4
EPOCHS = 200


class MyCNN(nn.Module):
    """LeNet-5 as the tutorial's class defines it (C1 6@5x5, S2, C3 16@5x5, S4, fc 120-84-10)."""

    def __init__(self, in_channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=in_channels, out_channels=6, kernel_size=5, stride=1)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(in_channels=6, out_channels=16, kernel_size=5, stride=1)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        side = ((size - 4) // 2 - 4) // 2  # 4 for 28x28 input
        self.fc1 = nn.Linear(in_features=16 * side * side, out_features=120)
        self.fc2 = nn.Linear(in_features=120, out_features=84)
        self.fc3 = nn.Linear(in_features=84, out_features=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor for 8-bit images: (H, W[, C]) uint8 -> (C, H, W) float32 in [0, 1]."""
    array = np.array(image, np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


class ImageFileDataset(Dataset):
    """One image per __getitem__, as torchvision.datasets.MNIST serves them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels  # (N, C, H, W) uint8, (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.images[index].numpy()  # (C, H, W) uint8
        if pixels.shape[0] == 1:
            image = Image.fromarray(pixels[0], mode="L")
        else:
            image = Image.fromarray(pixels.transpose(1, 2, 0))
        return to_tensor(image), int(self.labels[index])


def main(argv: list[str] | None = None) -> int:
    args = contender_parser(__doc__.splitlines()[0], EPOCHS).parse_args(argv)

    torch.manual_seed(args.seed)
    splits = bench_splits(args.dataset, args.train_limit, args.test_limit, args.seed)
    channels, size, _ = splits.image_shape
    train_loader = DataLoader(
        dataset=ImageFileDataset(splits.train.images, splits.train.labels), batch_size=BATCH_SIZE, shuffle=True
    )
    test_x = splits.test.images.to(torch.float32).div(255)  # what ToTensor gives, for the bench's own test
    device = torch.device("cpu")
    model = MyCNN(channels, size, len(splits.classes)).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters())

    record = Record("seed recipe", "seed 001: batch 4, Adam lr 0.001, per-image Dataset + DataLoader", BATCH_SIZE,
                    len(splits.train), args.seed)  # fmt: skip
    turns = Turns(args.turn_fds, record.turns)
    turns.take()
    clock = Clock(args.budget)
    batches = len(train_loader)
    for epoch in range(1, args.epochs + 1):
        started, done, images = time.perf_counter(), 0, 0
        for data, label in train_loader:
            data, label = data.to(device=device), label.to(device=device)
            pre = model(data)
            loss = criterion(pre, label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            images += len(label)
            if clock.spent():
                break
        seconds = time.perf_counter() - started
        record.stopped_by_budget = done < batches or (clock.spent() and epoch < args.epochs)
        elapsed = clock.elapsed()
        with clock.stopped():
            model.eval()
            accuracy = test_accuracy(model, test_x, splits.test.labels)
            model.train()
            record.add_epoch(round(epoch - 1 + done / batches, 3), elapsed, seconds, images, accuracy)
            record.final_test_accuracy = round(accuracy, 4)
            print(f"seed recipe: epoch {epoch - 1 + done / batches:.2f}  test {100 * accuracy:.2f}%", file=sys.stderr)
            turns.take()
        if record.stopped_by_budget:
            break
    record.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
