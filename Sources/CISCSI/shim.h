// libiscsi 1.19 (libiscsi-dev). Only Sources/Pools/ISCSIClient.swift imports this module.
#include <stdint.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

// REPORT LUNS answers with a flexible array member (`uint16_t luns[0]`), which Swift does not import.
static inline uint16_t ciscsi_reportluns_lun(const struct scsi_reportluns_list *list, uint32_t index) {
    return list->luns[index];
}
