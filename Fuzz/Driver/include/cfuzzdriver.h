#ifndef CFUZZDRIVER_H
#define CFUZZDRIVER_H

/// Runs libFuzzer's driver (`LLVMFuzzerRunDriver`, compiler-rt FuzzerInterface.h) on the fuzz
/// target's `LLVMFuzzerTestOneInput`: it parses libFuzzer's flags from argv and never returns
/// until the run ends. SwiftPM gives every executable its own main, so libFuzzer's main cannot
/// be used; the driver is linked in by -sanitize=fuzzer.
int poolfs_run_libfuzzer(int argc, char **argv);

#endif
