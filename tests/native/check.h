/* The native tests' one assertion: a failed CHECK counts and returns from
 * the test; main prints "N passed, N failed". */
#ifndef DH_TEST_CHECK_H
#define DH_TEST_CHECK_H

#include <stdio.h>

static int passed, failed;
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            failed++;                                                        \
            return;                                                          \
        }                                                                    \
    } while (0)

#endif
