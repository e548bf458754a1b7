// librados and librbd (librbd-dev, Ceph 16.2): their declarations, for the types and calls
// Sources/Pools/RBDClient.swift uses (only it imports this module). The calls are defined in
// loader.c, which loads the libraries on first use rather than linking them.
#include <stdint.h>
#include <time.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
