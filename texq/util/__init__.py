"""What every layer of texq uses: errors, atomic files, dotted keys and config building, devices
and memory layout, progress, CUDA graphs of training steps, small nn helpers."""
