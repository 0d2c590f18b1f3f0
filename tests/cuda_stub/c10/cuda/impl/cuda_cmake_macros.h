// Stand-in for the header CUDA builds of torch generate at configure time; the CPU wheel lacks it.
// Used only by the nvcc compile check in tests/test_build.py, never by a real build.
#pragma once
