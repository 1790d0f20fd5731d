// Runtime flag -> compile-time constant: f is instantiated for both values and called with one.
#pragma once

#include <type_traits>

namespace flash {

template <class F>
auto bool_switch(bool condition, F &&f) {
  return condition ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace flash
