# Big-endian, 32-bit entry as VOF calls a client program: switch to little-endian
# 64-bit mode in one rfid and continue right after this prologue. Assembled with
# -mbig-endian and included as raw bytes at the start of the little-endian image.
    .text
    mfmsr   11
    ori     11,11,1          # MSR[LE]
    li      12,1
    rldicr  12,12,63,0       # MSR[SF] = 1 << 63
    or      11,11,12
    bcl     20,31,1f
1:  mflr    10
    addi    10,10,(2f - 1b)
    mtsrr0  10
    mtsrr1  11
    rfid
2:
