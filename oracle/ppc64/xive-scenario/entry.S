# Little-endian 64-bit code from here: TOC pointer, own stack, then main().
    .section .text.entry, "ax"
    .globl _start
_start:
    .incbin "prologue.bin"
le64:
    bcl     20,31,1f
1:  mflr    12
    addis   2,12,(.TOC. - 1b)@ha
    addi    2,2,(.TOC. - 1b)@l
    addis   1,12,(stack_top - 1b)@ha
    addi    1,1,(stack_top - 1b)@l
    li      0,0
    stdu    0,-32(1)
    bl      main
    nop
2:  b       2b

    .globl hcall
# long hcall(unsigned long op, unsigned long *args_in9_out9)
hcall:
    std     4,-8(1)          # the args pointer, in the ELFv2 protected zone
    mr      11,4
    ld      4,0(11)
    ld      5,8(11)
    ld      6,16(11)
    ld      7,24(11)
    ld      8,32(11)
    ld      9,40(11)
    ld      10,48(11)
    sc      1
    ld      11,-8(1)
    std     4,0(11)
    std     5,8(11)
    std     6,16(11)
    std     7,24(11)
    blr

    .bss
    .balign 16
    .space  65536
stack_top:
