// The CUDA emulator stands in for the toolkit header (kernels/cuda/emu/cuda_emu.h).
#pragma once
#include "kernels/cuda/emu/cuda_emu.h"
