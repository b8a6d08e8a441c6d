# edm2x on a CUDA PyTorch base image. Build: docker build -t edm2x .
# Run:   docker run --gpus all -it --rm -v $PWD:/work -w /work edm2x \
#          torchrun --standalone --nproc_per_node=8 train_edm2.py --outdir=runs/x --data=data.zip --preset=edm2-img512-xs
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    DNNLIB_CACHE_DIR=/cache/dnnlib \
    HF_HOME=/cache/huggingface

WORKDIR /opt/edm2x
COPY pyproject.toml README.md ./
COPY dnnlib dnnlib
COPY torch_utils torch_utils
COPY training training
COPY *.py ./
RUN pip install --no-cache-dir '.[test]'

WORKDIR /work
