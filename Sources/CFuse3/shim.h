#ifndef POOLFS_CFUSE3_SHIM_H
#define POOLFS_CFUSE3_SHIM_H
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#endif
