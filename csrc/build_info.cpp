namespace fusedres {
#ifdef FUSEDRES_WITH_CUDA
bool built_with_cuda() { return true; }
#else
bool built_with_cuda() { return false; }
#endif
}  // namespace fusedres
