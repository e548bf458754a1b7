// librados and librbd (librbd-dev, Ceph 16.2). Only Sources/Pools/RBDClient.swift imports this module.
#include <stdint.h>
#include <time.h>
#include <rados/librados.h>
#include <rbd/librbd.h>
